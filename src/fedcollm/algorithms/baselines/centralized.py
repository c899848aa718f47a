"""Centralized (FedCoLLM paper §4.1): the LLM fine-tuned on every client's data plus the auxiliary set."""

from __future__ import annotations

from fedcollm.algorithms.base import Algorithm
from fedcollm.algorithms.registry import register
from fedcollm.algorithms.steps import llm_sft
from fedcollm.parties.client import ClientRuntime
from fedcollm.parties.server import ServerRuntime
from fedcollm.protocol import Arrays, ClientReply, Metric, Payload, Reporter


@register
class Centralized(Algorithm):
    """The LLM fine-tuned on the union of every client's shard and the auxiliary set.

    An upper bound that ignores privacy: one round is `train.epochs` epochs over the union.
    """

    name = "centralized"
    uses_llm = True
    uses_clients = False
    secure_aggregation = False

    def client_fit(
        self, client: ClientRuntime, payload: Payload, rnd: int, reporter: Reporter
    ) -> ClientReply:
        raise RuntimeError("Centralized has no client step")

    def eval_roles(self, server: ServerRuntime) -> list[str]:
        return [role for role in super().eval_roles(server) if role == "llm"]

    def server_update(
        self, server: ServerRuntime, aggregate: Arrays, rnd: int, reporter: Reporter
    ) -> list[Metric]:
        config = self.config
        assert config.llm is not None
        llm = server.model("llm")
        if "union" not in server.state:
            requests = server.data.union_requests(config)  # every client's questions + aux
            server.state["union"] = llm.encode_sft(requests, config.train.max_length)
        union = server.state["union"]
        reporter.phase(f"round {rnd} · centralized training on {len(union)} examples")
        result = llm_sft(config, llm, union, rnd, reporter)
        return [Metric(rnd, "llm", None, "train_loss", result.mean_loss)]
