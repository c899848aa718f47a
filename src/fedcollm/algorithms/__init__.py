"""Algorithms, one package each (the three co-tuning systems) and the paper's baselines;
importing this package registers them all."""

from fedcollm.algorithms.base import Algorithm
from fedcollm.algorithms.baselines import Centralized, FedAvg, Standalone, ZeroShot
from fedcollm.algorithms.crosslm import CrossLM
from fedcollm.algorithms.fedcollm import FedCoLLM
from fedcollm.algorithms.fedmkt import FedMKT
from fedcollm.algorithms.registry import ALGORITHMS, check_config, register

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "Centralized",
    "CrossLM",
    "FedAvg",
    "FedCoLLM",
    "FedMKT",
    "Standalone",
    "ZeroShot",
    "check_config",
    "register",
]
