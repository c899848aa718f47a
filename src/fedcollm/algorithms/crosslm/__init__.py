"""CrossLM (Deng et al., 2023): SLMs steer the LLM's synthetic task data (`synthetic`), which
then trains both sides."""

from fedcollm.algorithms.crosslm.algorithm import CANDIDATES, FEEDBACK, SYNTHETIC, CrossLM

__all__ = ["CANDIDATES", "FEEDBACK", "SYNTHETIC", "CrossLM"]
