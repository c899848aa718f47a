"""The contract every algorithm fulfils: a handful of hooks, as in Flower's strategies.

A round: `configure_fit` builds what clients receive, each client runs `client_fit`, the server
`screen_fit`s and `aggregate_fit`s the replies and runs `server_update` on the aggregate, then
`evaluate`. Engines call these hooks and only move the messages between them. Before anything
loads, `check_config` says whether an experiment can run at all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, ClassVar

from fedcollm.algorithms.steps import (
    answer_model,
    evaluate_role,
    generation_items,
    mean_over_clients,
    score_items,
    score_model,
)
from fedcollm.config import ExperimentConfig
from fedcollm.data.generative import GenerationItem
from fedcollm.evaluation import records
from fedcollm.evaluation.free_text import summary
from fedcollm.evaluation.multiple_choice import multiple_choice
from fedcollm.evaluation.records import GenerationSet, QuestionSet
from fedcollm.federation import wire
from fedcollm.federation.robust import AGGREGATORS, Rejection, screen_uploads
from fedcollm.lm.lora import get_adapter, set_adapter
from fedcollm.parties.client import ClientRuntime
from fedcollm.parties.server import ServerRuntime
from fedcollm.protocol import Arrays, ClientReply, Metric, Payload, Reporter


class Algorithm(ABC):
    """A federated co-tuning algorithm as a handful of hooks."""

    name: ClassVar[str]
    uses_llm: ClassVar[bool] = False
    """Whether the server loads an LLM."""
    uses_clients: ClassVar[bool] = True
    """Whether rounds involve the clients (Centralized and Zero-Shot train or do nothing alone)."""
    secure_aggregation: ClassVar[bool] = True
    """Whether `aggregate_fit` is a weighted mean that secure aggregation may compute instead."""
    aggregates_adapters: ClassVar[bool] = True
    """Whether `aggregate_fit` averages the clients' adapters (what client-level DP noises)."""
    trains_llm_and_slm_together: ClassVar[bool] = False
    """Whether the server trains its LLM and SLM in one step (both activations at once in memory)."""
    evaluates_on_clients: ClassVar[bool] = False
    """Whether clients evaluate their own SLMs (when the server never holds their adapters)."""
    server_state_keys: ClassVar[tuple[str, ...]] = ()
    """Entries of `server.state` that carry over between rounds (checkpointed; the rest are caches)."""
    client_state_keys: ClassVar[tuple[str, ...]] = ()
    """Entries of `client.state` that carry over between rounds (checkpointed; the rest are caches)."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config

    @classmethod
    def check_config(cls, config: ExperimentConfig) -> list[str]:
        """Why `config` cannot run this algorithm, one reason per item (empty: it can).

        Holds every check that needs more than one config section; a single section validates
        itself. The run, `fedcollm run --dry-run` and every client call it before anything
        loads, so a dry run refuses exactly what a run would. Subclasses extend the list.
        """
        problems = []
        if cls.uses_llm and config.llm is None:
            problems.append(f"algorithm {cls.name!r} needs an [llm] section (the server's LLM)")
        problems += cls.privacy_problems(config)
        if cls.needs_auxiliary_set(config) and config.task.aux_fraction <= 0:
            problems.append(
                f"algorithm {cls.name!r} trains on the server's auxiliary set: set task.aux_fraction > 0"
            )
        return problems

    @classmethod
    def privacy_problems(cls, config: ExperimentConfig) -> list[str]:
        """Why `privacy` cannot hold for this algorithm and config (empty: it can, or it is off)."""
        privacy = config.privacy
        if privacy.mode == "off":
            return []
        problems = []
        if not (cls.uses_clients and cls.aggregates_adapters):
            problems.append(
                f"privacy.mode = {privacy.mode!r} noises the clients' adapter mean, and algorithm "
                f"{cls.name!r} aggregates no adapter mean (docs/privacy.md says what its messages reveal)"
            )
        if config.federation.weighting != "uniform":
            problems.append(
                f"privacy.mode = {privacy.mode!r} calibrates its noise to a uniform mean: set "
                'federation.weighting = "uniform" (example-count weights change a client\'s influence)'
            )
        if config.robustness.aggregation != "mean":
            problems.append(
                f'privacy.mode = {privacy.mode!r} needs robustness.aggregation = "mean", not '
                f"{config.robustness.aggregation!r}"
            )
        return problems

    @classmethod
    def secure_aggregation_problems(cls, config: ExperimentConfig) -> list[str]:
        """Why `config` cannot run this algorithm under secure aggregation (empty: it can).

        Asked only where secure aggregation really replaces `aggregate_fit`: the transport offers
        it and the algorithm declares `secure_aggregation`. The server then sees no individual
        upload, so no setting that needs one may stand (`RobustnessConfig`).
        """
        problems = config.robustness.secure_aggregation_problems()
        if config.privacy.mode == "central":
            problems.append(
                'privacy.mode = "central" clips each client\'s upload on the server, which secure '
                "aggregation (SecAgg+) hides: run without SecAgg+ (no --secagg; run config secagg=false)"
            )
        return problems

    @classmethod
    def aggregates_securely(cls, secure_transport: bool) -> bool:
        """Whether a round's uploads are securely aggregated on a transport that offers it (or not)."""
        return secure_transport and cls.uses_clients and cls.secure_aggregation

    @classmethod
    def needs_auxiliary_set(cls, config: ExperimentConfig) -> bool:
        """Whether the server's step uses the auxiliary set D_a (default: no)."""
        return False

    def num_rounds(self) -> int:
        """How many rounds to run (default: `federation.rounds`)."""
        return self.config.federation.rounds

    def configure_fit(self, server: ServerRuntime, rnd: int, reporter: Reporter) -> Payload:
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
        return screen_uploads(decoded, server.global_adapter, reference, robustness.screening_multiple)

    def aggregate_fit(self, server: ServerRuntime, replies: Sequence[ClientReply], rnd: int) -> Arrays:
        """Combine client replies (default: FedAvg's mean weighted as `federation.weighting` says,
        or a robust rule)."""
        robustness = self.config.robustness
        return AGGREGATORS[robustness.aggregation](
            replies, robustness.trim_fraction, self.config.federation.weighting
        )

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
            metrics += evaluate_role(self.config, server, role, rnd, reporter, adapter)
        return metrics

    def client_evaluate(
        self, client: ClientRuntime, payload: Payload, rnd: int, reporter: Reporter
    ) -> ClientReply:
        """A client scores an SLM: the adapter the payload carries (the global one, sent for the
        client's own evaluation file), else its own current adapter.

        On the public evaluation set (unless the payload says `local_only`) the reply carries the
        metrics and, for the per-question records, every choice's log-likelihood
        (`records.to_wire`) or every generated answer's scores: the server knows the questions.
        On the client's own evaluation file (`task.client_eval`) it carries only the scores,
        prefixed `local_`; nothing of that file leaves the client.
        """
        if payload.arrays:
            set_adapter(client.slm.model, self.from_wire(payload.arrays))
        elif "adapter" in client.state:
            set_adapter(client.slm.model, client.state["adapter"])
        arrays: Arrays = {}
        metrics: dict[str, float] = {}
        n = 0
        if not payload.config.get("local_only"):
            reporter.phase(f"round {rnd} · client {client.client_id} evaluating its {client.slm.name}")
            if client.eval_requests and isinstance(client.eval_requests[0], GenerationItem):
                # Its answers stay on the node; the server learns each answer's scores.
                answers = answer_model(
                    self.config, client.slm, generation_items(client.eval_requests), reporter
                )
                arrays, n, metrics = (
                    records.generation_scores_to_wire(answers),
                    len(answers),
                    summary(answers),
                )
            else:
                result = score_model(
                    self.config, client.slm, client.encoded_eval(self.config), reporter, client.resources
                )
                arrays, n, metrics = records.to_wire(result.loglikelihoods), result.n, result.summary()
        if client.local_eval:
            reporter.phase(f"round {rnd} · client {client.client_id} evaluating on its own evaluation file")
            own = score_items(self.config, client.slm, client.local_eval, reporter)
            metrics |= {f"local_{key}": value for key, value in own.items()}
        return ClientReply(client.client_id, arrays, n, metrics)

    def aggregate_evaluate(self, replies: Sequence[ClientReply], rnd: int) -> list[Metric]:
        """Per-client SLM accuracy and its mean over clients (role "slm", client None)."""
        metrics = [
            Metric(rnd, "slm", r.client, key, value) for r in replies for key, value in r.metrics.items()
        ]
        return metrics + mean_over_clients(metrics, rnd)

    def client_question_sets(
        self, server: ServerRuntime, replies: Sequence[ClientReply], rnd: int
    ) -> list[QuestionSet | GenerationSet]:
        """The per-question records of the clients' own evaluations (`client_evaluate`'s replies)."""
        if server.data.kind == "generation":
            items = generation_items(server.eval_requests)
            ids, references = [i.id for i in items], [i.references for i in items]
            return [
                GenerationSet(
                    rnd,
                    "slm",
                    r.client,
                    "eval",
                    tuple(records.generation_scores_from_wire(r.arrays, ids, references, r.client)),
                )
                for r in replies
            ]
        requests = multiple_choice(server.eval_requests)
        return [
            QuestionSet.from_loglikelihoods(
                rnd,
                "slm",
                r.client,
                requests,
                records.from_wire(r.arrays, requests, r.client),
            )
            for r in replies
        ]

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
