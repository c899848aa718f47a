"""FedMKT (Fan et al., COLING 2025), Algorithms 1 and 2: selective mutual knowledge transfer.

Clients may each run a different SLM (own tokenizer). Per round t:

1. ClientUpdate1: a client trains its LoRA on its private shard, then computes its knowledge set
   S_k on the public set D_p (per-sample loss, top-K logits at every answer position) and
   uploads it in compact form (`fedcollm.algorithms.fedmkt.knowledge`).
2. The server validates every upload (a bad one is rejected and logged, the round goes on),
   aligns each to the LLM's tokenizer (MinED `TokenBridge`), selects per sample with DualMinCE
   (lowest client loss, kept only if below the LLM's own loss) and trains the LLM adapter with
   lambda*CE (all public samples) + (1-lambda)*KD (selected samples).
3. The server computes S_0 on D_p with the updated LLM and sends it to every client.
4. ClientUpdate2: each client aligns S_0 to its tokenizer, selects with DualMinCE against its own
   loss, trains its adapter with lambda*CE + (1-lambda)*KD.

Mapping onto the round loop (one client phase per loop round): loop round t's client step is
ClientUpdate2 on S_0 of round t-1 (from round 2 on), then ClientUpdate1 of round t. The loop runs
`federation.rounds + 1` exchanges; the last one (numbered T+1 in metrics.jsonl) is client-only:
clients consume S_0 of round T with ClientUpdate2 and upload nothing, so no server knowledge is
wasted and the final evaluation sees every client after its last ClientUpdate2. The LLM does not
change in that exchange; its evaluation there repeats round T's (cached, not recomputed).

The SLM adapters never leave the clients (unless `fedmkt.fedavg_homogeneous` and all clients run
the same SLM): each keeps its adapter in `client.state["adapter"]` and evaluates its own SLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedcollm.algorithms.base import Algorithm
from fedcollm.algorithms.fedmkt.knowledge import (
    KnowledgeError,
    KnowledgeSet,
    align_knowledge,
    compute_knowledge,
    dual_min_ce,
    select_teachers,
    train_with_knowledge,
    validate_knowledge,
)
from fedcollm.algorithms.fedmkt.report import knowledge_traffic, results_lines, round_traffic, traffic_metrics
from fedcollm.algorithms.registry import register
from fedcollm.algorithms.steps import client_sft, evaluate_llm_while_changed, round_span
from fedcollm.config import ExperimentConfig
from fedcollm.data.generative import TrainItem
from fedcollm.errors import RoundError
from fedcollm.federation.aggregate import weighted_mean
from fedcollm.federation.robust import Rejection
from fedcollm.lm.encoding import Encoded
from fedcollm.lm.lora import get_adapter, set_adapter
from fedcollm.lm.training_items import encode_item
from fedcollm.parties.client import ClientRuntime
from fedcollm.parties.server import ServerRuntime
from fedcollm.protocol import Arrays, ClientReply, Metric, Payload, Reporter, Seed, derive_seed

UP = "knowledge."
"""Prefix of a client's knowledge set in its reply."""
DOWN = "server."
"""Prefix of the server's knowledge set S_0 in the payload."""
ADAPTER = "adapter."
"""Prefix of adapters when homogeneous clients also FedAvg them."""


class FedMKTError(RoundError):
    """A FedMKT round that cannot go on (e.g. every client's upload was rejected)."""


def encode_answers(
    tokenizer: Any, items: Sequence[TrainItem], max_length: int, plain: str = "alpaca"
) -> list[Encoded]:
    """Public examples in a tokenizer whose model the caller does not hold (answer tokens matter)."""
    return [encode_item(tokenizer, item, add_bos=False, max_length=max_length, plain=plain) for item in items]


def vocab_size(tokenizer: Any) -> int:
    return len(tokenizer)


def logit_width(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def _prefixed(arrays: Arrays, prefix: str) -> Arrays:
    return {name.removeprefix(prefix): a for name, a in arrays.items() if name.startswith(prefix)}


@register
class FedMKT(Algorithm):
    """Federated mutual knowledge transfer between a server LLM and heterogeneous client SLMs."""

    name = "fedmkt"
    uses_llm = True
    secure_aggregation = False
    aggregates_adapters = False
    evaluates_on_clients = True
    server_state_keys = ("own_loss", "server_knowledge", "adapter_avg", "llm_version", "knowledge_rounds")
    client_state_keys = ("adapter", "own_loss", "own_knowledge")

    @classmethod
    def check_config(cls, config: ExperimentConfig) -> list[str]:
        problems = super().check_config(config)
        names = {
            config.federation.client_model(k, config.slm.name) for k in range(config.federation.num_clients)
        }
        if config.fedmkt.fedavg_homogeneous and len(names) > 1:
            problems.append(
                "fedmkt.fedavg_homogeneous needs every client on the same SLM, but "
                "federation.client_models runs " + ", ".join(sorted(names))
            )
        return problems

    @classmethod
    def needs_auxiliary_set(cls, config: ExperimentConfig) -> bool:
        return True  # the public set D_p

    def num_rounds(self) -> int:
        """T rounds plus one client-only exchange in which clients consume the last S_0."""
        return self.config.federation.rounds + 1

    def _final(self, rnd: int) -> bool:
        return rnd == self.num_rounds()

    # ------------------------------------------------------------------ client side

    def _own_adapter(self, client: ClientRuntime) -> Arrays:
        """This client's adapter: kept across rounds, else its model's initial adapter."""
        adapter: Arrays = client.state.get("adapter", client.slm.initial_adapter)
        return adapter

    def _client_public(self, client: ClientRuntime) -> list[Encoded]:
        if "public" not in client.state:
            client.state["public"] = client.slm.encode_sft(
                client.public_requests, self.config.train.max_length
            )
        return client.state["public"]

    def _client_knowledge(self, client: ClientRuntime, reporter: Reporter) -> KnowledgeSet:
        public = self._client_public(client)
        reporter.phase(f"client {client.client_id} knowledge on {len(public)} public examples")
        return compute_knowledge(
            client.slm.model,
            public,
            pad_id=client.slm.pad_id,
            top_k=self.config.fedmkt.top_k,
            batch_size=self.config.eval.batch_size,
            vocab_size=min(vocab_size(client.slm.tokenizer), logit_width(client.slm.model)),
            reduction=self.config.fedmkt.loss_reduction,
            on_batch=lambda b, total: reporter.advance(b, total),
        )

    def _client_update2(
        self, client: ClientRuntime, payload: Payload, rnd: int, reporter: Reporter, refresh_loss: bool
    ) -> dict[str, float]:
        """Align S_0 to this client's tokenizer, DualMinCE against its own loss, train L3."""
        config, mkt = self.config, self.config.fedmkt
        assert config.llm is not None
        llm_name = config.llm.name
        llm_tok = client.resources.tokenizer(llm_name)
        requests = client.public_requests
        server_set = KnowledgeSet.unpack(payload.arrays, DOWN, who="the server")
        server_public = encode_answers(llm_tok, requests, config.train.max_length, config.task.plain_template)
        validate_knowledge(
            server_set,
            who="the server",
            num_samples=len(requests),
            lengths=[e.n_target for e in server_public],
            vocab_size=vocab_size(llm_tok),
            max_top_k=mkt.top_k,
        )
        public = self._client_public(client)
        own_loss, own = self._client_own(client, reporter, refresh_loss)
        reporter.phase(f"round {rnd} · client {client.client_id} aligning the server's knowledge")
        bridge = client.resources.bridge(llm_name, client.slm.name)
        aligned = align_knowledge(
            server_set, server_public, public, bridge, dst_vocab_size=logit_width(client.slm.model)
        )
        chosen = dual_min_ce(aligned.loss[None, :], own_loss)
        reporter.phase(f"round {rnd} · client {client.client_id} ClientUpdate2 (L3)", None)
        result = train_with_knowledge(
            client.slm.model,
            public,
            select_teachers(chosen, [aligned], own),
            pad_id=client.slm.pad_id,
            lr=config.slm.lr,
            cfg=config.train,
            epochs=mkt.slm_epochs,
            ce_weight=mkt.ce_weight,
            temperature=mkt.temperature,
            seed=derive_seed(config.seed, Seed.KNOWLEDGE_CLIENT, rnd, client.client_id),
            on_step=reporter.step_callback(),
            span=round_span(config, rnd - 1),  # round rnd consumes round rnd - 1's S_0: rounds 2..T+1
        )
        client.state["adapter"] = get_adapter(client.slm.model)
        client.state.pop("own_loss", None)  # the adapter changed
        client.state.pop("own_knowledge", None)
        return {
            "kd_loss": result.mean_loss,
            "kd_kd": result.mean_kd,
            "kd_selected": float((chosen >= 0).sum()),
        }

    def _client_own(
        self, client: ClientRuntime, reporter: Reporter, refresh: bool
    ) -> tuple[np.ndarray, KnowledgeSet | None]:
        """The client's own per-sample public loss, and its own set where `no_teacher_target = "own"`.

        Both are kept from ClientUpdate1 unless the adapter changed since (`refresh`: a FedAvg'd
        adapter arrived) or they are missing.
        """
        wants_own = self.config.fedmkt.no_teacher_target == "own"
        missing = "own_loss" not in client.state or (wants_own and "own_knowledge" not in client.state)
        stale = refresh or missing
        if stale:
            knowledge = self._client_knowledge(client, reporter)
            return knowledge.loss, knowledge if wants_own else None
        own = KnowledgeSet.unpack(client.state["own_knowledge"], who="this client") if wants_own else None
        return client.state["own_loss"]["loss"], own

    def client_fit(
        self, client: ClientRuntime, payload: Payload, rnd: int, reporter: Reporter
    ) -> ClientReply:
        config = self.config
        set_adapter(client.slm.model, self._own_adapter(client))
        metrics: dict[str, float] = {}
        averaged = _prefixed(payload.arrays, ADAPTER)
        if averaged:
            set_adapter(client.slm.model, averaged)
            client.state["adapter"] = averaged
        if any(name.startswith(DOWN) for name in payload.arrays):
            metrics |= self._client_update2(client, payload, rnd, reporter, refresh_loss=bool(averaged))
        if payload.config.get("final", False):
            client.state["adapter"] = get_adapter(client.slm.model)
            return ClientReply(client.client_id, {}, len(client.train), metrics)
        reporter.phase(f"round {rnd} · client {client.client_id} ClientUpdate1 (local SFT)", None)
        result = client_sft(config, client, client.train, rnd, reporter)
        knowledge = self._client_knowledge(client, reporter)
        adapter = get_adapter(client.slm.model)
        client.state["adapter"] = adapter
        client.state["own_loss"] = {"loss": knowledge.loss}
        if config.fedmkt.no_teacher_target == "own":
            client.state["own_knowledge"] = knowledge.pack()
        arrays = knowledge.pack(UP)
        metrics |= {
            "train_loss": result.mean_loss,
            "steps": float(result.steps),
            "public_loss": float(np.mean(knowledge.loss)),
            "knowledge_bytes": float(sum(a.nbytes for a in arrays.values())),
        }
        if config.fedmkt.fedavg_homogeneous:
            arrays |= {ADAPTER + name: a for name, a in adapter.items()}
        return ClientReply(client.client_id, arrays, result.num_examples, metrics)

    def client_evaluate(
        self, client: ClientRuntime, payload: Payload, rnd: int, reporter: Reporter
    ) -> ClientReply:
        set_adapter(client.slm.model, self._own_adapter(client))
        return super().client_evaluate(client, payload, rnd, reporter)

    # ------------------------------------------------------------------ server side

    def _client_model(self, client: int) -> str:
        return self.config.federation.client_model(client, self.config.slm.name)

    def _public_for(self, server: ServerRuntime, name: str) -> list[Encoded]:
        """The public set in model `name`'s tokenisation (answer tokens as that model sees them)."""
        cache = server.state.setdefault("public_by_model", {})
        if name not in cache:
            cache[name] = encode_answers(
                server.resources.tokenizer(name),
                server.aux_requests,
                self.config.train.max_length,
                self.config.task.plain_template,
            )
        return cache[name]

    def configure_fit(self, server: ServerRuntime, rnd: int, reporter: Reporter) -> Payload:
        arrays: Arrays = {}
        if "server_knowledge" in server.state:
            arrays |= server.state["server_knowledge"]
        if "adapter_avg" in server.state:
            arrays |= {ADAPTER + name: a for name, a in server.state.pop("adapter_avg").items()}
        return Payload(arrays, {"round": rnd, "final": self._final(rnd)})

    def screen_fit(
        self, server: ServerRuntime, payload: Payload, replies: Sequence[ClientReply], rnd: int
    ) -> tuple[list[ClientReply], list[Rejection]]:
        # Uploads are knowledge sets, not adapters: `aggregate_fit` validates them one by one.
        return list(replies), []

    def aggregate_fit(self, server: ServerRuntime, replies: Sequence[ClientReply], rnd: int) -> Arrays:
        """Validate each upload; keep the good ones for `server_update`, note the rejected ones."""
        accepted: dict[int, KnowledgeSet] = {}
        rejected: list[tuple[int, str]] = []
        if self._final(rnd):
            server.state["uploads"], server.state["rejections"] = accepted, rejected
            return {}
        requests = server.aux_requests
        num_clients = self.config.federation.num_clients
        for reply in replies:
            who = f"client {reply.client}"
            try:
                if not 0 <= reply.client < num_clients:
                    raise KnowledgeError(f"{who}: no such client (the federation has {num_clients})")
                name = self._client_model(reply.client)
                knowledge = KnowledgeSet.unpack(reply.arrays, UP, who=who)
                accepted[reply.client] = validate_knowledge(
                    knowledge,
                    who=who,
                    num_samples=len(requests),
                    lengths=[e.n_target for e in self._public_for(server, name)],
                    vocab_size=vocab_size(server.resources.tokenizer(name)),
                    max_top_k=self.config.fedmkt.top_k,
                )
            except KnowledgeError as exc:
                rejected.append((reply.client, f"round {rnd}: rejected the upload of {exc}"))
        server.state["uploads"], server.state["rejections"] = accepted, rejected
        server.state["round_up_bytes"] = sum(
            int(a.nbytes) for r in replies for n, a in r.arrays.items() if n.startswith(UP)
        )
        if self.config.fedmkt.fedavg_homogeneous:
            kept = [
                ClientReply(r.client, _prefixed(r.arrays, ADAPTER), r.num_examples)
                for r in replies
                if r.client in accepted
            ]
            if kept:
                server.state["adapter_avg"] = weighted_mean(kept, self.config.federation.weighting)
        return {}

    def _llm_knowledge(self, server: ServerRuntime, reporter: Reporter, top_k: int) -> KnowledgeSet:
        llm = server.model("llm")
        public = server.state["public_llm"]
        reporter.phase(f"LLM knowledge on {len(public)} public examples")
        return compute_knowledge(
            llm.model,
            public,
            pad_id=llm.pad_id,
            top_k=top_k,
            batch_size=self.config.eval.batch_size,
            vocab_size=min(vocab_size(llm.tokenizer), logit_width(llm.model)),
            reduction=self.config.fedmkt.loss_reduction,
            on_batch=lambda b, total: reporter.advance(b, total),
        )

    def _llm_own(self, server: ServerRuntime, reporter: Reporter) -> tuple[np.ndarray, KnowledgeSet | None]:
        """The LLM's own per-sample public loss, and its own set where `no_teacher_target = "own"`.

        After round 1 both come from the set the LLM computed at the end of the previous round
        (the knowledge it sends down, `server_knowledge`); round 1 computes them.
        """
        if self.config.fedmkt.no_teacher_target != "own":
            if "own_loss" not in server.state:
                server.state["own_loss"] = self._llm_knowledge(server, reporter, top_k=0).loss
            return server.state["own_loss"], None
        if "server_knowledge" in server.state:
            own = KnowledgeSet.unpack(server.state["server_knowledge"], DOWN, who="the server")
        else:
            own = self._llm_knowledge(server, reporter, top_k=self.config.fedmkt.top_k)
        return own.loss, own

    def server_update(
        self, server: ServerRuntime, aggregate: Arrays, rnd: int, reporter: Reporter
    ) -> list[Metric]:
        if self._final(rnd):
            server.state.pop("server_knowledge", None)
            return []
        config, mkt = self.config, self.config.fedmkt
        assert config.llm is not None
        llm = server.model("llm")
        metrics: list[Metric] = []
        for client, reason in server.state.get("rejections", []):
            reporter.message(reason)
            metrics.append(Metric(rnd, "client", client, "rejected", 1.0))
        uploads: dict[int, KnowledgeSet] = server.state.get("uploads", {})
        if not uploads:
            reasons = "; ".join(r for _, r in server.state.get("rejections", [])) or "no client replied"
            raise FedMKTError(f"FedMKT round {rnd}: no usable client knowledge set ({reasons})")
        if "public_llm" not in server.state:
            server.state["public_llm"] = llm.encode_sft(server.aux_requests, config.train.max_length)
        public = server.state["public_llm"]
        own_loss, own = self._llm_own(server, reporter)
        width = logit_width(llm.model)
        clients = sorted(uploads)
        aligned = []
        for k in clients:
            name = self._client_model(k)
            bridge = server.resources.bridge(name, llm.name)
            if bridge is not None:
                reporter.phase(f"round {rnd} · aligning client {k}'s knowledge ({name} -> {llm.name})")
            aligned.append(
                align_knowledge(
                    uploads[k], self._public_for(server, name), public, bridge, dst_vocab_size=width
                )
            )
        chosen = dual_min_ce(np.stack([a.loss for a in aligned]), own_loss)
        selected = int((chosen >= 0).sum())
        reporter.phase(f"round {rnd} · server trains the LLM (L2, {selected} selected)", None)
        result = train_with_knowledge(
            llm.model,
            public,
            select_teachers(chosen, aligned, own),
            pad_id=llm.pad_id,
            lr=config.llm.lr,
            cfg=config.train,
            epochs=mkt.llm_epochs,
            ce_weight=mkt.ce_weight,
            temperature=mkt.temperature,
            seed=derive_seed(config.seed, Seed.KNOWLEDGE_LLM, rnd),
            on_step=reporter.step_callback(),
            span=round_span(config, rnd),
        )
        server_set = self._llm_knowledge(server, reporter, top_k=mkt.top_k)
        server.state["own_loss"] = server_set.loss
        server.state["server_knowledge"] = server_set.pack(DOWN)
        server.state["llm_version"] = server.state.get("llm_version", 0) + 1
        metrics += [
            Metric(rnd, "llm", None, "train_loss", result.mean_loss),
            Metric(rnd, "llm", None, "train_ce", result.mean_ce),
            Metric(rnd, "llm", None, "train_kd", result.mean_kd),
            Metric(rnd, "llm", None, "selected", float(selected)),
            Metric(rnd, "llm", None, "public_loss", float(np.mean(server_set.loss))),
        ]
        metrics += [
            Metric(rnd, "client", k, "selected_by_server", float((chosen == i).sum()))
            for i, k in enumerate(clients)
        ]
        entry = round_traffic(
            self.config, rnd, len(uploads), server.state.get("round_up_bytes", 0), server_set
        )
        server.state.setdefault("knowledge_rounds", []).append(entry)
        metrics += traffic_metrics(entry)
        return metrics

    # ------------------------------------------------------------------ evaluation and report

    def eval_roles(self, server: ServerRuntime) -> list[str]:
        """The server evaluates only its LLM; clients evaluate their own SLMs."""
        return [role for role in super().eval_roles(server) if role == "llm"]

    def evaluate(self, server: ServerRuntime, rnd: int, reporter: Reporter) -> list[Metric]:
        """The LLM (reused while it is unchanged)."""
        return evaluate_llm_while_changed(
            server, rnd, lambda: super(FedMKT, self).evaluate(server, rnd, reporter)
        )

    def communication_extra(self, server: ServerRuntime) -> dict[str, Any]:
        """Knowledge-set traffic against the paper's N*S*K, for communication.json."""
        public = server.state.get("public_llm", [])
        rounds = server.state.get("knowledge_rounds", [])
        return {"knowledge": knowledge_traffic(self.config, rounds, len(server.aux_requests), public)}

    def results_extra(self, metrics: Sequence[Metric], communication: dict[str, Any]) -> list[str]:
        """Per-client SLM accuracy before/after and the knowledge-set traffic, for results.md."""
        return results_lines(self.config, metrics, communication)
