"""The contract every algorithm fulfils, and the registry the config resolves names against.

A round, as in Flower's strategies: `configure_fit` builds what clients receive, each client
runs `client_fit`, the server `aggregate_fit`s the replies and runs `server_update` on the
aggregate, then `evaluate`. Engines call these hooks and only move the messages between them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np

from fedcollm.config import ExperimentConfig
from fedcollm.evaluation.multiple_choice import evaluate
from fedcollm.federation import wire
from fedcollm.federation.robust import AGGREGATORS, Rejection, screen_uploads
from fedcollm.lm.encoding import Encoded
from fedcollm.lm.models import Arrays, LoadedModel, get_adapter, set_adapter
from fedcollm.parties.runtime import (
    ClientReply,
    ClientRuntime,
    Metric,
    Payload,
    Reporter,
    ServerRuntime,
    derive_seed,
    pad_id,
)
from fedcollm.training.sft import TrainResult, train_sft

ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make an algorithm selectable by its `name` in configs."""
    if cls.name in ALGORITHMS:
        raise ValueError(f"algorithm name {cls.name!r} registered twice")
    ALGORITHMS[cls.name] = cls
    return cls


class Algorithm(ABC):
    """A federated co-tuning algorithm as a handful of hooks."""

    name: ClassVar[str]
    uses_llm: ClassVar[bool] = False
    """Whether the server loads an LLM."""
    uses_clients: ClassVar[bool] = True
    """Whether rounds involve the clients (Centralized and Zero-Shot train or do nothing alone)."""
    secure_aggregation: ClassVar[bool] = True
    """Whether `aggregate_fit` is a weighted mean that secure aggregation may compute instead."""
    evaluates_on_clients: ClassVar[bool] = False
    """Whether clients evaluate their own SLMs (when the server never holds their adapters)."""
    server_state_keys: ClassVar[tuple[str, ...]] = ()
    """Entries of `server.state` that carry over between rounds (checkpointed; the rest are caches)."""
    client_state_keys: ClassVar[tuple[str, ...]] = ()
    """Entries of `client.state` that carry over between rounds (checkpointed; the rest are caches)."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config

    def num_rounds(self) -> int:
        """How many rounds to run (default: `federation.rounds`)."""
        return self.config.federation.rounds

    def configure_fit(self, server: ServerRuntime, rnd: int) -> Payload:
        """What every client receives at the start of round `rnd` (default: the global adapter).

        The adapter travels in `federation.transport_dtype` (`to_wire`).
        """
        return Payload(arrays=self.to_wire(server.global_adapter), config={"round": rnd})

    def to_wire(self, arrays: Arrays) -> Arrays:
        """Adapter arrays as they travel: cast to `federation.transport_dtype` (see `wire`)."""
        return wire.encode(arrays, self.config.federation.transport_dtype)

    def from_wire(self, arrays: Arrays) -> Arrays:
        """Received adapter arrays back in float32 (the inverse of `to_wire`)."""
        return wire.decode(arrays, self.config.federation.transport_dtype)

    @abstractmethod
    def client_fit(
        self, client: ClientRuntime, payload: Payload, rnd: int, reporter: Reporter
    ) -> ClientReply:
        """A client's local work for one round."""

    def screen_fit(
        self, server: ServerRuntime, payload: Payload, replies: Sequence[ClientReply], rnd: int
    ) -> tuple[list[ClientReply], list[Rejection]]:
        """Refuse malformed or outlying adapter uploads before they touch the aggregate.

        Uploads are decoded from the transport dtype first, so screening and aggregation see
        float32 arrays only.
        """
        robustness = self.config.robustness
        reference = self.from_wire(payload.arrays) or None
        decoded = [replace(reply, arrays=self.from_wire(reply.arrays)) for reply in replies]
        return screen_uploads(decoded, server.global_adapter, reference, robustness.norm_multiple)

    def aggregate_fit(self, server: ServerRuntime, replies: Sequence[ClientReply], rnd: int) -> Arrays:
        """Combine client replies (default: FedAvg's example-weighted mean, or a robust rule)."""
        robustness = self.config.robustness
        return AGGREGATORS[robustness.aggregation](replies, robustness.trim_fraction)

    @abstractmethod
    def server_update(
        self, server: ServerRuntime, aggregate: Arrays, rnd: int, reporter: Reporter
    ) -> list[Metric]:
        """The server's work on the aggregate; must leave the next global adapter in `server`."""

    def evaluate(self, server: ServerRuntime, rnd: int, reporter: Reporter) -> list[Metric]:
        """Zero-shot accuracy of the global SLM and (if any) the LLM on the evaluation set."""
        metrics: list[Metric] = []
        for role in self.eval_roles(server):
            adapter = server.global_adapter if role == "slm" else None
            metrics += evaluate_role(self, server, role, rnd, reporter, adapter)
        return metrics

    def client_evaluate(
        self, client: ClientRuntime, payload: Payload, rnd: int, reporter: Reporter
    ) -> ClientReply:
        """A client scores its own SLM (its current adapter) on the public evaluation set."""
        if "adapter" in client.state:
            set_adapter(client.slm.model, client.state["adapter"])
        reporter.phase(f"round {rnd} · client {client.client_id} evaluating its {client.slm.name}")
        result = evaluate(
            client.slm.model,
            client.slm.tokenizer,
            client.encoded_eval(self.config),
            add_bos=client.slm.add_bos,
            batch_size=self.config.eval.batch_size,
            on_batch=lambda b, total: reporter.advance(b, total),
        )
        return ClientReply(client.client_id, {}, result.n, result.summary())

    def aggregate_evaluate(self, replies: Sequence[ClientReply], rnd: int) -> list[Metric]:
        """Per-client SLM accuracy and its mean over clients (role "slm", client None)."""
        metrics = [
            Metric(rnd, "slm", r.client, key, value) for r in replies for key, value in r.metrics.items()
        ]
        return metrics + mean_over_clients(metrics, rnd)

    def server_state(self, server: ServerRuntime) -> dict[str, Any]:
        """What the server must keep to continue after a round: adapters and `server_state_keys`.

        Values are arrays, scalars, and lists/dicts of them (what a checkpoint stores).
        """
        state: dict[str, Any] = {"global_adapter": server.global_adapter}
        if server.llm is not None:
            state["llm_adapter"] = get_adapter(server.llm.model)
        state["state"] = {key: server.state[key] for key in self.server_state_keys if key in server.state}
        return state

    def restore_server_state(self, server: ServerRuntime, state: dict[str, Any]) -> None:
        """Inverse of `server_state` on a freshly created server."""
        server.global_adapter = state["global_adapter"]
        if server.llm is not None:
            set_adapter(server.llm.model, state["llm_adapter"])
        server.state.update(state["state"])

    def client_state(self, client: ClientRuntime) -> dict[str, Any]:
        """What a client must keep between rounds (`client_state_keys`), for checkpoints."""
        return {key: client.state[key] for key in self.client_state_keys if key in client.state}

    def restore_client_state(self, client: ClientRuntime, state: dict[str, Any]) -> None:
        """Inverse of `client_state` on a freshly created client."""
        client.state.update(state)

    def communication_extra(self, server: ServerRuntime) -> dict[str, Any]:
        """Algorithm-specific entries merged into communication.json (default: none)."""
        return {}

    def results_extra(self, metrics: Sequence[Metric], communication: dict[str, Any]) -> list[str]:
        """Algorithm-specific markdown lines appended to results.md (default: none)."""
        return []

    def eval_roles(self, server: ServerRuntime) -> list[str]:
        """The configured models to evaluate that this algorithm has."""
        have = {"slm": True, "llm": self.uses_llm and server.llm is not None}
        return [role for role in self.config.eval.models if have[role]]


def mean_over_clients(metrics: Sequence[Metric], rnd: int, role: str = "slm") -> list[Metric]:
    """The mean of each per-client metric, as the paper reports clients' SLMs."""
    keys = sorted({m.metric for m in metrics if m.client is not None})
    return [
        Metric(
            rnd,
            role,
            None,
            key,
            float(np.mean([m.value for m in metrics if m.metric == key and m.client is not None])),
        )
        for key in keys
    ]


def evaluate_role(
    algorithm: Algorithm,
    server: ServerRuntime,
    role: str,
    rnd: int,
    reporter: Reporter,
    adapter: Arrays | None = None,
    client: int | None = None,
) -> list[Metric]:
    """Evaluate one model (with `adapter` loaded into it, if given) and return its metrics."""
    lm = server.model(role)
    if adapter is not None:
        set_adapter(lm.model, adapter)
    who = f"{role} ({lm.name})" if client is None else f"{role} of client {client}"
    reporter.phase(f"round {rnd} · evaluating {who}")
    result = evaluate(
        lm.model,
        lm.tokenizer,
        server.encoded_eval(role),
        add_bos=lm.add_bos,
        batch_size=algorithm.config.eval.batch_size,
        on_batch=lambda b, total: reporter.advance(b, total),
    )
    return [Metric(rnd, role, client, key, value) for key, value in result.summary().items()]


def train_client_adapter(
    algorithm: Algorithm, client: ClientRuntime, payload: Payload, rnd: int, reporter: Reporter
) -> ClientReply:
    """The standard local update: start from the payload's adapter, train E epochs, send it back.

    The payload's adapter arrives and the reply's leaves in `federation.transport_dtype`.
    """
    set_adapter(client.slm.model, algorithm.from_wire(payload.arrays))
    reporter.phase(f"round {rnd} · client {client.client_id} training", None)
    result = client_sft(algorithm.config, client, client.train, rnd, reporter)
    return ClientReply(
        client=client.client_id,
        arrays=algorithm.to_wire(get_adapter(client.slm.model)),
        num_examples=result.num_examples,
        metrics={"train_loss": result.mean_loss, "steps": float(result.steps)},
    )


def client_sft(
    config: ExperimentConfig,
    client: ClientRuntime,
    examples: Sequence[Encoded],
    rnd: int,
    reporter: Reporter,
) -> TrainResult:
    """A client's local SFT of its SLM adapter, seeded by round and client so every engine agrees."""
    return train_sft(
        client.slm.model,
        examples,
        pad_id=pad_id(client.slm),
        lr=config.slm.lr,
        cfg=config.train,
        seed=derive_seed(config.seed, rnd, 100 + client.client_id),
        on_step=reporter.step_callback(),
    )


def llm_sft(
    config: ExperimentConfig,
    llm: LoadedModel,
    examples: Sequence[Encoded],
    rnd: int,
    reporter: Reporter,
    *,
    epochs: int | None = None,
    weights: Sequence[float] | None = None,
) -> TrainResult:
    """The server's SFT of its LLM adapter (Centralized, CrossLM), seeded by round."""
    assert config.llm is not None
    return train_sft(
        llm.model,
        examples,
        pad_id=pad_id(llm),
        lr=config.llm.lr,
        cfg=config.train,
        seed=derive_seed(config.seed, rnd, 2),
        epochs=epochs,
        on_step=reporter.step_callback(),
        weights=weights,
    )
