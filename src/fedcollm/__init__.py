"""fedcollm: federated co-tuning of a server's LLM and clients' SLMs.

Algorithms (FedCoLLM, FedAvg, ...) are written once as hooks in `fedcollm.algorithms`; engines
in `fedcollm.engines` only move their messages. Start with `fedcollm run` or
`fedcollm.engines.run_experiment`.
"""

__version__ = "0.1.0"
