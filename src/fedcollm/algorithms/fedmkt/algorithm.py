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

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedcollm.algorithms.base import Algorithm, client_sft, register
from fedcollm.algorithms.fedmkt.knowledge import (
    KnowledgeError,
    KnowledgeSet,
    align_knowledge,
    compute_knowledge,
    dense_reference_bytes,
    dual_min_ce,
    select_teachers,
    train_with_knowledge,
    validate_knowledge,
)
from fedcollm.align.bridge import TokenBridge
from fedcollm.config import ExperimentConfig
from fedcollm.data import MCRequest
from fedcollm.federation.aggregate import weighted_mean
from fedcollm.federation.robust import Rejection
from fedcollm.lm.encoding import Encoded, encode_pair
from fedcollm.lm.models import Arrays, get_adapter, load_tokenizer, set_adapter
from fedcollm.parties.runtime import (
    ClientReply,
    ClientRuntime,
    ExperimentData,
    Metric,
    Payload,
    Reporter,
    ServerRuntime,
    derive_seed,
    encode_sft,
    pad_id,
)
from fedcollm.training.distill import same_tokenizer

UP = "knowledge."
"""Prefix of a client's knowledge set in its reply."""
DOWN = "server."
"""Prefix of the server's knowledge set S_0 in the payload."""
ADAPTER = "adapter."
"""Prefix of adapters when homogeneous clients also FedAvg them."""


class FedMKTError(RuntimeError):
    """A FedMKT round that cannot go on (e.g. every client's upload was rejected)."""


# Per-process caches: tokenizers and vocabulary bridges by model name, the public set by experiment,
# and each loaded SLM's initial adapter (clients of one model share the loaded copy).
_TOKENIZERS: dict[str, Any] = {}
_BRIDGES: dict[tuple[str, str], TokenBridge | None] = {}
_PUBLIC: dict[str, list[MCRequest]] = {}
_INITIAL: weakref.WeakKeyDictionary[Any, Arrays] = weakref.WeakKeyDictionary()


def _tokenizer(name: str) -> Any:
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = load_tokenizer(name)
    return _TOKENIZERS[name]


def bridge_between(src_name: str, src_tok: Any, dst_name: str, dst_tok: Any) -> TokenBridge | None:
    """The MinED bridge src -> dst (built once per pair and process; None if they tokenise alike)."""
    key = (src_name, dst_name)
    if key not in _BRIDGES:
        if src_name == dst_name or same_tokenizer(src_tok, dst_tok):
            _BRIDGES[key] = _BRIDGES[(dst_name, src_name)] = None
        elif (dst_name, src_name) in _BRIDGES:
            other = _BRIDGES[(dst_name, src_name)]
            _BRIDGES[key] = other.reversed() if other is not None else None
        else:
            _BRIDGES[key] = TokenBridge.build(src_tok, dst_tok)
    return _BRIDGES[key]


def public_requests(config: ExperimentConfig) -> list[MCRequest]:
    """The public set D_p: the server's auxiliary questions, which every party can rebuild."""
    key = config.to_toml()
    if key not in _PUBLIC:
        _PUBLIC.clear()
        _PUBLIC[key] = ExperimentData.load(config).aux_requests(config)
    return _PUBLIC[key]


def encode_answers(tokenizer: Any, requests: Sequence[MCRequest], max_length: int) -> list[Encoded]:
    """Public examples in a tokenizer whose model the caller does not hold (answer tokens matter)."""
    return [
        encode_pair(tokenizer, r.context, r.continuations[r.gold], max_length=max_length) for r in requests
    ]


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
    evaluates_on_clients = True
    server_state_keys = ("own_loss", "server_knowledge", "adapter_avg", "llm_version", "knowledge_rounds")
    client_state_keys = ("adapter", "own_loss")

    def __init__(self, config: ExperimentConfig) -> None:
        super().__init__(config)
        if config.llm is None:
            raise ValueError("FedMKT needs an [llm] section (the server's LLM)")
        if config.task.aux_fraction <= 0:
            raise ValueError("FedMKT needs a public set: set task.aux_fraction > 0")
        names = {
            config.federation.client_model(k, config.slm.name) for k in range(config.federation.num_clients)
        }
        if config.fedmkt.fedavg_homogeneous and len(names) > 1:
            raise ValueError(
                "fedmkt.fedavg_homogeneous needs every client on the same SLM, but clients run "
                + ", ".join(sorted(names))
            )

    def num_rounds(self) -> int:
        """T rounds plus one client-only exchange in which clients consume the last S_0."""
        return self.config.federation.rounds + 1

    def _final(self, rnd: int) -> bool:
        return rnd == self.num_rounds()

    # ------------------------------------------------------------------ client side

    def _own_adapter(self, client: ClientRuntime) -> Arrays:
        """This client's adapter: kept across rounds, else its model's initial adapter."""
        if "adapter" in client.state:
            return client.state["adapter"]
        model = client.slm.model
        if model not in _INITIAL:
            _INITIAL[model] = get_adapter(model)
        return _INITIAL[model]

    def _client_public(self, client: ClientRuntime) -> list[Encoded]:
        if "public" not in client.state:
            client.state["public"] = encode_sft(
                client.slm, public_requests(self.config), self.config.train.max_length
            )
        return client.state["public"]

    def _client_knowledge(self, client: ClientRuntime, reporter: Reporter) -> KnowledgeSet:
        public = self._client_public(client)
        reporter.phase(f"client {client.client_id} knowledge on {len(public)} public examples")
        return compute_knowledge(
            client.slm.model,
            public,
            pad_id=pad_id(client.slm),
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
        llm_tok = _tokenizer(llm_name)
        requests = public_requests(config)
        server_set = KnowledgeSet.unpack(payload.arrays, DOWN, who="the server")
        server_public = encode_answers(llm_tok, requests, config.train.max_length)
        validate_knowledge(
            server_set,
            who="the server",
            num_samples=len(requests),
            lengths=[e.n_target for e in server_public],
            vocab_size=vocab_size(llm_tok),
            max_top_k=mkt.top_k,
        )
        public = self._client_public(client)
        if refresh_loss or "own_loss" not in client.state:
            own_loss = self._client_knowledge(client, reporter).loss
        else:
            own_loss = client.state["own_loss"]["loss"]
        reporter.phase(f"round {rnd} · client {client.client_id} aligning the server's knowledge")
        bridge = bridge_between(llm_name, llm_tok, client.slm.name, client.slm.tokenizer)
        aligned = align_knowledge(
            server_set, server_public, public, bridge, dst_vocab_size=logit_width(client.slm.model)
        )
        chosen = dual_min_ce(aligned.loss[None, :], own_loss)
        reporter.phase(f"round {rnd} · client {client.client_id} ClientUpdate2 (L3)", None)
        result = train_with_knowledge(
            client.slm.model,
            public,
            select_teachers(chosen, [aligned]),
            pad_id=pad_id(client.slm),
            lr=config.slm.lr,
            cfg=config.train,
            epochs=mkt.slm_epochs,
            ce_weight=mkt.ce_weight,
            temperature=mkt.temperature,
            seed=derive_seed(config.seed, rnd, 200 + client.client_id),
            on_step=reporter.step_callback(),
        )
        client.state["adapter"] = get_adapter(client.slm.model)
        client.state.pop("own_loss", None)  # the adapter changed
        return {
            "kd_loss": result.mean_loss,
            "kd_kd": result.mean_kd,
            "kd_selected": float(result.num_selected),
        }

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
                _tokenizer(name), public_requests(self.config), self.config.train.max_length
            )
        return cache[name]

    def configure_fit(self, server: ServerRuntime, rnd: int) -> Payload:
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
        requests = public_requests(self.config)
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
                    vocab_size=vocab_size(_tokenizer(name)),
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
                server.state["adapter_avg"] = weighted_mean(kept)
        return {}

    def _llm_knowledge(self, server: ServerRuntime, reporter: Reporter, top_k: int) -> KnowledgeSet:
        llm = server.model("llm")
        public = server.state["public_llm"]
        reporter.phase(f"LLM knowledge on {len(public)} public examples")
        return compute_knowledge(
            llm.model,
            public,
            pad_id=pad_id(llm),
            top_k=top_k,
            batch_size=self.config.eval.batch_size,
            vocab_size=min(vocab_size(llm.tokenizer), logit_width(llm.model)),
            reduction=self.config.fedmkt.loss_reduction,
            on_batch=lambda b, total: reporter.advance(b, total),
        )

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
            server.state["public_llm"] = encode_sft(llm, public_requests(config), config.train.max_length)
        public = server.state["public_llm"]
        if "own_loss" not in server.state:
            server.state["own_loss"] = self._llm_knowledge(server, reporter, top_k=0).loss
        own_loss = server.state["own_loss"]
        width = logit_width(llm.model)
        clients = sorted(uploads)
        aligned = []
        for k in clients:
            name = self._client_model(k)
            bridge = bridge_between(name, _tokenizer(name), llm.name, llm.tokenizer)
            if bridge is not None:
                reporter.phase(f"round {rnd} · aligning client {k}'s knowledge ({name} -> {llm.name})")
            aligned.append(
                align_knowledge(
                    uploads[k], self._public_for(server, name), public, bridge, dst_vocab_size=width
                )
            )
        chosen = dual_min_ce(np.stack([a.loss for a in aligned]), own_loss)
        reporter.phase(f"round {rnd} · server trains the LLM (L2, {int((chosen >= 0).sum())} selected)", None)
        result = train_with_knowledge(
            llm.model,
            public,
            select_teachers(chosen, aligned),
            pad_id=pad_id(llm),
            lr=config.llm.lr,
            cfg=config.train,
            epochs=mkt.llm_epochs,
            ce_weight=mkt.ce_weight,
            temperature=mkt.temperature,
            seed=derive_seed(config.seed, rnd, 1),
            on_step=reporter.step_callback(),
        )
        server_set = self._llm_knowledge(server, reporter, top_k=mkt.top_k)
        server.state["own_loss"] = server_set.loss
        server.state["server_knowledge"] = server_set.pack(DOWN)
        server.state["llm_version"] = server.state.get("llm_version", 0) + 1
        metrics += [
            Metric(rnd, "llm", None, "train_loss", result.mean_loss),
            Metric(rnd, "llm", None, "train_ce", result.mean_ce),
            Metric(rnd, "llm", None, "train_kd", result.mean_kd),
            Metric(rnd, "llm", None, "selected", float(result.num_selected)),
            Metric(rnd, "llm", None, "public_loss", float(np.mean(server_set.loss))),
        ]
        metrics += [
            Metric(rnd, "client", k, "selected_by_server", float((chosen == i).sum()))
            for i, k in enumerate(clients)
        ]
        metrics += self._communication(server, rnd, len(uploads), server_set)
        return metrics

    def _communication(
        self, server: ServerRuntime, rnd: int, accepted: int, server_set: KnowledgeSet
    ) -> list[Metric]:
        """Knowledge-set bytes this round against the paper's dense N*S*K form."""
        config = self.config
        n = len(server_set)
        clients = config.federation.num_clients
        dense = dense_reference_bytes(n, config.train.max_length, config.fedmkt.top_k)
        entry = {
            "round": rnd,
            "up_sets": accepted,
            "up_bytes": server.state.get("round_up_bytes", 0),
            "down_bytes_per_client": server_set.nbytes,
            "down_bytes": server_set.nbytes * clients,
            "dense_bytes_per_set": dense,
        }
        server.state.setdefault("knowledge_rounds", []).append(entry)
        return [
            Metric(rnd, "server", None, "knowledge_up_bytes", float(entry["up_bytes"])),
            Metric(rnd, "server", None, "knowledge_down_bytes", float(entry["down_bytes"])),
            Metric(rnd, "server", None, "knowledge_dense_bytes_per_set", float(dense)),
        ]

    # ------------------------------------------------------------------ evaluation and report

    def eval_roles(self, server: ServerRuntime) -> list[str]:
        """The server evaluates only its LLM; clients evaluate their own SLMs."""
        return [role for role in super().eval_roles(server) if role == "llm"]

    def evaluate(self, server: ServerRuntime, rnd: int, reporter: Reporter) -> list[Metric]:
        version = server.state.get("llm_version", 0)
        cached = server.state.get("llm_eval")
        if cached is not None and cached[0] == version:
            return [Metric(rnd, m.role, m.client, m.metric, m.value) for m in cached[1]]
        metrics = super().evaluate(server, rnd, reporter)
        server.state["llm_eval"] = (version, tuple(metrics))
        return list(metrics)

    def communication_extra(self, server: ServerRuntime) -> dict[str, Any]:
        """Knowledge-set traffic against the paper's N*S*K, for communication.json."""
        config = self.config
        rounds = server.state.get("knowledge_rounds", [])
        n = len(public_requests(config))
        public = server.state.get("public_llm", [])
        sets = sum(r["up_sets"] for r in rounds) + sum(config.federation.num_clients for _ in rounds)
        sent = sum(r["up_bytes"] + r["down_bytes"] for r in rounds)
        dense = sets * dense_reference_bytes(n, config.train.max_length, config.fedmkt.top_k)
        mean_len = float(np.mean([len(e.input_ids) for e in public])) if public else 0.0
        all_positions = sets * round(n * mean_len) * config.fedmkt.top_k * 8
        return {
            "knowledge": {
                "formula": "paper: N*S*K entries per knowledge set (N samples, S positions, K logits)",
                "public_samples_N": n,
                "sequence_length_S": config.train.max_length,
                "top_k_K": config.fedmkt.top_k,
                "dense_entry_bytes": 8,
                "dense_entry": "float32 logit + int32 id",
                "compact_form": (
                    "only answer positions; ids int32, values float16; loss float32, lengths int32"
                ),
                "sets_sent": sets,
                "bytes_sent": sent,
                "dense_bytes_N_S_K": dense,
                "dense_bytes_actual_lengths": all_positions,
                "saving_vs_N_S_K_percent": 100.0 * (1 - sent / dense) if dense else None,
                "saving_vs_actual_lengths_percent": 100.0 * (1 - sent / all_positions)
                if all_positions
                else None,
                "mean_sequence_length": mean_len,
                "rounds": rounds,
            }
        }

    def results_extra(self, metrics: Sequence[Metric], communication: dict[str, Any]) -> list[str]:
        """Per-client SLM accuracy before/after and the knowledge-set traffic, for results.md."""
        lines: list[str] = [""]
        if not self.config.fedmkt.fedavg_homogeneous:
            lines += [
                "FedMKT sends no adapters (the line above gives the SLM adapter's size only); clients and "
                "server exchange knowledge sets.",
                "",
            ]
        evaluated = sorted({m.round for m in metrics if m.metric == "acc" and m.role == "slm"})
        if evaluated:
            first, last = evaluated[0], evaluated[-1]
            lines += [
                "Clients' own SLMs (FedMKT never averages them; the SLM row above is their mean):",
                "",
                "| client | model | acc before | acc after | acc_norm before | acc_norm after |",
                "|---|---|---|---|---|---|",
            ]
            for k in range(self.config.federation.num_clients):
                cells = []
                for key in ("acc", "acc_norm"):
                    for rnd in (first, last):
                        value = next(
                            (
                                m.value
                                for m in metrics
                                if m.role == "slm" and m.client == k and m.round == rnd and m.metric == key
                            ),
                            None,
                        )
                        cells.append("-" if value is None else f"{100 * value:.1f}")
                lines.append(f"| {k} | {self._client_model(k)} | {' | '.join(cells)} |")
            lines.append("")
        rejected = [m for m in metrics if m.metric == "rejected"]
        if rejected:
            lines += [
                f"Rejected uploads: {', '.join(f'client {m.client} (round {m.round})' for m in rejected)}.",
                "",
            ]
        knowledge = communication.get("knowledge")
        if knowledge and knowledge["sets_sent"]:
            lines += [
                f"Knowledge sets: {knowledge['sets_sent']} sent, "
                f"{knowledge['bytes_sent'] / 1e6:.2f} MB in the "
                f"compact form (answer positions only, int32 ids, float16 logits) vs "
                f"{knowledge['dense_bytes_N_S_K'] / 1e6:.1f} MB as the paper's N·S·K "
                f"(N={knowledge['public_samples_N']}, S={knowledge['sequence_length_S']}, "
                f"K={knowledge['top_k_K']}, 8 B per entry): "
                f"{knowledge['saving_vs_N_S_K_percent']:.2f}% saved "
                f"({knowledge['saving_vs_actual_lengths_percent']:.2f}% vs every position of the "
                "actual sequences).",
                "",
            ]
        return lines
