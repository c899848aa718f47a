"""FedAvg (McMahan et al., 2017): clients fine-tune the SLM adapter; the server averages it.

The paper's FedAvg baseline, and the base class of FedCoLLM, which adds only a server step.
"""

from __future__ import annotations

from fedcollm.algorithms.base import Algorithm, register, train_client_adapter
from fedcollm.lm.models import Arrays
from fedcollm.parties.runtime import ClientReply, ClientRuntime, Metric, Payload, Reporter, ServerRuntime


@register
class FedAvg(Algorithm):
    """Clients only: local LoRA fine-tuning, example-weighted averaging, no LLM."""

    name = "fedavg"

    def client_fit(
        self, client: ClientRuntime, payload: Payload, rnd: int, reporter: Reporter
    ) -> ClientReply:
        return train_client_adapter(self, client, payload, rnd, reporter)

    def server_update(
        self, server: ServerRuntime, aggregate: Arrays, rnd: int, reporter: Reporter
    ) -> list[Metric]:
        server.global_adapter = aggregate
        return []
