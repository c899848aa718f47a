"""Algorithms, one module each; importing this package registers them all."""

from fedcollm.algorithms.base import ALGORITHMS, Algorithm, register
from fedcollm.algorithms.baselines import Centralized, Standalone, ZeroShot
from fedcollm.algorithms.crosslm import CrossLM
from fedcollm.algorithms.fedavg import FedAvg
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
