"""FedCoLLM (Fan et al., 2024): FedAvg of SLM adapters, then server-side mutual distillation
between the LLM and the aggregated SLM on the auxiliary set."""

from fedcollm.algorithms.fedcollm.algorithm import FedCoLLM

__all__ = ["FedCoLLM"]
