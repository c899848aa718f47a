"""The FedCoLLM paper's baselines (§4.1): Zero-Shot, Standalone, FedAvg and Centralized.

All reuse the same local training and evaluation as FedCoLLM, so a comparison differs only in
what each method is allowed to see. FedAvg is also the base class of FedCoLLM, which adds only a
server step.
"""

from fedcollm.algorithms.baselines.centralized import Centralized
from fedcollm.algorithms.baselines.fedavg import FedAvg
from fedcollm.algorithms.baselines.standalone import Standalone
from fedcollm.algorithms.baselines.zeroshot import ZeroShot

__all__ = ["Centralized", "FedAvg", "Standalone", "ZeroShot"]
