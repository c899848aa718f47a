"""FedMKT (Fan et al., COLING 2025): selective mutual knowledge transfer between a server LLM and
heterogeneous client SLMs, through top-K logits on a public set (`knowledge`)."""

from fedcollm.algorithms.fedmkt.algorithm import ADAPTER, DOWN, UP, FedMKT, FedMKTError

__all__ = ["ADAPTER", "DOWN", "UP", "FedMKT", "FedMKTError"]
