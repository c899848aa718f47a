"""Standalone (FedCoLLM paper §4.1): each client fine-tunes its own adapter alone; nothing is averaged."""

from __future__ import annotations

from collections.abc import Sequence

from fedcollm.algorithms.base import Algorithm
from fedcollm.algorithms.registry import register
from fedcollm.algorithms.steps import evaluate_role, mean_over_clients, train_client_adapter
from fedcollm.errors import RoundError
from fedcollm.lm.lora import get_adapter
from fedcollm.parties.client import ClientRuntime
from fedcollm.parties.server import ServerRuntime
from fedcollm.protocol import Arrays, ClientReply, Metric, Payload, Reporter


@register
class Standalone(Algorithm):
    """Each client fine-tunes its own adapter on its own shard only; nothing is averaged.

    The server only collects the adapters to evaluate them; accuracy is reported per client and
    as the mean over clients (role "slm", client None), as the paper's Table 2 does.
    """

    name = "standalone"
    secure_aggregation = False
    aggregates_adapters = False
    server_state_keys = ("client_adapters",)
    client_state_keys = ("adapter",)

    def configure_fit(self, server: ServerRuntime, rnd: int, reporter: Reporter) -> Payload:
        # Round 1 starts every client from the same initial adapter; afterwards each continues its own.
        return Payload(arrays=self.to_wire(server.global_adapter) if rnd == 1 else {}, config={"round": rnd})

    def client_fit(
        self, client: ClientRuntime, payload: Payload, rnd: int, reporter: Reporter
    ) -> ClientReply:
        start = client.state.get("adapter", payload.arrays)
        if not start:
            raise RoundError(
                f"client {client.client_id} lost its standalone adapter between rounds (a restarted "
                "SuperNode?)"
            )
        reply = train_client_adapter(self.config, client, Payload(start, payload.config), rnd, reporter)
        # The client keeps its own adapter in float32; only the upload travels in the transport dtype.
        client.state["adapter"] = get_adapter(client.slm.model)
        return reply

    def aggregate_fit(self, server: ServerRuntime, replies: Sequence[ClientReply], rnd: int) -> Arrays:
        server.state["client_adapters"] = {reply.client: reply.arrays for reply in replies}
        return {}

    def server_update(
        self, server: ServerRuntime, aggregate: Arrays, rnd: int, reporter: Reporter
    ) -> list[Metric]:
        return []

    def evaluate(self, server: ServerRuntime, rnd: int, reporter: Reporter) -> list[Metric]:
        adapters: dict[int, Arrays] = server.state.get("client_adapters", {})
        if not adapters:  # before training every client holds the initial adapter
            return super().evaluate(server, rnd, reporter)
        metrics: list[Metric] = []
        for client, adapter in sorted(adapters.items()):
            metrics += evaluate_role(self.config, server, "slm", rnd, reporter, adapter, client=client)
        return metrics + mean_over_clients(metrics, rnd)
