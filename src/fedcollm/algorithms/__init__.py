"""Algorithms, one package each (the three co-tuning systems) and the paper's baselines;
importing this package registers them all."""

from fedcollm.algorithms.base import ALGORITHMS, Algorithm, register
from fedcollm.algorithms.baselines import Centralized, FedAvg, Standalone, ZeroShot
from fedcollm.algorithms.crosslm import CrossLM
from fedcollm.algorithms.fedcollm import FedCoLLM
from fedcollm.algorithms.fedmkt import FedMKT

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
    "register",
]
