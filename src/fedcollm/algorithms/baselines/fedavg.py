"""FedAvg (McMahan et al., 2017): clients fine-tune the SLM adapter; the server averages it.

The paper's FedAvg baseline, and the base class of FedCoLLM, which adds only a server step.
"""

from __future__ import annotations

from fedcollm.algorithms.base import Algorithm
from fedcollm.algorithms.registry import register
from fedcollm.algorithms.steps import train_client_adapter
from fedcollm.parties.client import ClientRuntime
from fedcollm.parties.server import ServerRuntime
from fedcollm.protocol import Arrays, ClientReply, Metric, Payload, Reporter


@register
class FedAvg(Algorithm):
    """Clients only: local LoRA fine-tuning, example-weighted averaging, no LLM."""

    name = "fedavg"

    def client_fit(
        self, client: ClientRuntime, payload: Payload, rnd: int, reporter: Reporter
    ) -> ClientReply:
        return train_client_adapter(self.config, client, payload, rnd, reporter)

    def server_update(
        self, server: ServerRuntime, aggregate: Arrays, rnd: int, reporter: Reporter
    ) -> list[Metric]:
        server.global_adapter = aggregate
        return []
