"""Zero-Shot (FedCoLLM paper §4.1): the models as they come, no training at all."""

from __future__ import annotations

from fedcollm.algorithms.base import Algorithm
from fedcollm.algorithms.registry import register
from fedcollm.parties.client import ClientRuntime
from fedcollm.parties.server import ServerRuntime
from fedcollm.protocol import Arrays, ClientReply, Metric, Payload, Reporter


@register
class ZeroShot(Algorithm):
    """No training at all: the models' accuracy as they come."""

    name = "zeroshot"
    uses_llm = True
    uses_clients = False

    def num_rounds(self) -> int:
        return 0

    def client_fit(
        self, client: ClientRuntime, payload: Payload, rnd: int, reporter: Reporter
    ) -> ClientReply:
        raise RuntimeError("Zero-Shot has no client step")

    def server_update(
        self, server: ServerRuntime, aggregate: Arrays, rnd: int, reporter: Reporter
    ) -> list[Metric]:
        return []
