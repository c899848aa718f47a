"""Building blocks the algorithms share: the standard local update, the SFT steps of clients
and of the server's LLM, and the evaluation of one model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from fedcollm.config import ExperimentConfig
from fedcollm.data.generative import EvalItem, GenerationItem
from fedcollm.evaluation.free_text import answer_items, summary
from fedcollm.evaluation.generation import GenerationSettings
from fedcollm.evaluation.multiple_choice import (
    EncodedRequests,
    EvalResult,
    encode_requests,
    multiple_choice,
    score,
    scoring_length,
    sequence_loglikelihoods,
)
from fedcollm.evaluation.records import GeneratedRecord, GenerationSet, QuestionSet
from fedcollm.federation import wire
from fedcollm.federation.privacy import mechanism
from fedcollm.lm.encoding import Encoded
from fedcollm.lm.lora import get_adapter, set_adapter
from fedcollm.lm.models import LoadedModel
from fedcollm.parties.client import ClientRuntime
from fedcollm.parties.resources import SharedResources
from fedcollm.parties.server import ServerRuntime
from fedcollm.protocol import Arrays, ClientReply, Metric, Payload, Reporter, Seed, derive_seed
from fedcollm.training.optimise import ScheduleSpan
from fedcollm.training.sft import TrainResult, train_sft


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


def score_model(
    config: ExperimentConfig,
    lm: LoadedModel,
    encoded: EncodedRequests,
    reporter: Reporter,
    resources: SharedResources,
) -> EvalResult:
    """Zero-shot acc/acc_norm of `lm` (its current adapter) on encoded questions.

    While the adapter is the identity (before any training) and the run has a `BaselineStore`
    (`resources.baselines`: a comparison's), the base model's log-likelihoods are read from it if
    another run computed them, and stored for the next run otherwise.
    """
    if not encoded.requests:
        raise ValueError("no questions to evaluate")

    def compute() -> np.ndarray:
        batch_size = config.eval.batch_size
        return sequence_loglikelihoods(lm.model, encoded.sequences, lm.pad_id, batch_size, reporter.advance)

    store = resources.baselines
    if store is None:
        return score(encoded, compute())
    lls, reused = store.loglikelihoods(lm.name, lm.model, encoded, config.eval.batch_size, compute)
    if reused:
        reporter.message(f"{lm.name}: base-model evaluation reused from {store.folder}")
    return score(encoded, lls)


def generation_items(items: Sequence[EvalItem]) -> list[GenerationItem]:
    """`items` as the free-text items they are (a task family makes one kind per run)."""
    out = [item for item in items if isinstance(item, GenerationItem)]
    if len(out) != len(items):
        raise TypeError("a generation task's evaluation set holds multiple-choice items")
    return out


def answer_model(
    config: ExperimentConfig, lm: LoadedModel, items: Sequence[GenerationItem], reporter: Reporter
) -> list[GeneratedRecord]:
    """`lm`'s generated answers (its current adapter) to `items`, scored (`eval.max_new_tokens`,
    greedy unless `eval.do_sample`, sampled from the evaluation seed)."""
    if not items:
        raise ValueError("no examples to evaluate")
    settings = GenerationSettings(
        max_new_tokens=config.eval.max_new_tokens,
        until=(),
        do_sample=config.eval.do_sample,
        temperature=config.eval.temperature,
        top_p=config.eval.top_p,
        batch_size=config.eval.batch_size,
    )
    return answer_items(
        lm.model,
        lm.tokenizer,
        items,
        add_bos=lm.add_bos,
        plain=lm.plain_template,
        settings=settings,
        seed=config.eval_seed,
        on_batch=reporter.advance,
    )


def score_items(
    config: ExperimentConfig, lm: LoadedModel, items: Sequence[EvalItem], reporter: Reporter
) -> dict[str, float]:
    """`lm`'s scores (its current adapter) on items that no record is kept of (a client's own
    evaluation file): acc and acc_norm of chosen answers, or those of generated answers."""
    if items and isinstance(items[0], GenerationItem):
        return summary(answer_model(config, lm, generation_items(items), reporter))
    encoded = encode_requests(
        lm.tokenizer,
        multiple_choice(items),
        add_bos=lm.add_bos,
        max_length=scoring_length(lm.model, lm.tokenizer),
    )
    lls = sequence_loglikelihoods(
        lm.model, encoded.sequences, lm.pad_id, config.eval.batch_size, reporter.advance
    )
    return score(encoded, lls).summary()


def evaluate_role(
    config: ExperimentConfig,
    server: ServerRuntime,
    role: str,
    rnd: int,
    reporter: Reporter,
    adapter: Arrays | None = None,
    client: int | None = None,
) -> list[Metric]:
    """Evaluate one model (with `adapter` loaded into it, if given) and return its metrics.

    Its per-question records go to `server.evaluations` (the run writes them to `questions/`).
    """
    lm = server.model(role)
    if adapter is not None:
        set_adapter(lm.model, adapter)
    who = f"{role} ({lm.name})" if client is None else f"{role} of client {client}"
    reporter.phase(f"round {rnd} · evaluating {who}")
    if server.data.kind == "generation":
        records = answer_model(config, lm, generation_items(server.eval_requests), reporter)
        server.evaluations.append(GenerationSet(rnd, role, client, "eval", tuple(records)))
        return [Metric(rnd, role, client, key, value) for key, value in summary(records).items()]
    encoded = server.encoded_eval(role)
    result = score_model(config, lm, encoded, reporter, server.resources)
    server.evaluations.append(
        QuestionSet.from_loglikelihoods(rnd, role, client, encoded.requests, result.loglikelihoods)
    )
    return [Metric(rnd, role, client, key, value) for key, value in result.summary().items()]


def evaluate_llm_while_changed(
    server: ServerRuntime, rnd: int, evaluate: Callable[[], list[Metric]]
) -> list[Metric]:
    """`evaluate()`, or its last result again while the LLM has not changed since.

    For algorithms whose LLM trains in some rounds only: they count its versions in
    `server.state["llm_version"]`. A reused evaluation is recorded for round `rnd`, per-question
    records included.
    """
    version = server.state.get("llm_version", 0)
    cached = server.state.get("llm_eval")
    if cached is not None and cached[0] == version:
        server.evaluations += [replace(qset, round=rnd) for qset in cached[2]]
        return [Metric(rnd, m.role, m.client, m.metric, m.value) for m in cached[1]]
    metrics = evaluate()
    server.state["llm_eval"] = (version, tuple(metrics), tuple(server.evaluations))
    return list(metrics)


def train_client_adapter(
    config: ExperimentConfig, client: ClientRuntime, payload: Payload, rnd: int, reporter: Reporter
) -> ClientReply:
    """The standard local update: start from the payload's adapter, train E epochs, send it back.

    The payload's adapter arrives and the reply's leaves in `federation.transport_dtype`.
    """
    dtype = config.federation.transport_dtype
    received = wire.decode(payload.arrays, dtype)
    set_adapter(client.slm.model, received)
    reporter.phase(f"round {rnd} · client {client.client_id} training", None)
    result = client_sft(config, client, client.train, rnd, reporter)
    adapter = get_adapter(client.slm.model)
    if config.privacy.mode == "distributed":
        adapter = distributed_share(config, adapter, received, rnd, client.client_id)
    return ClientReply(
        client=client.client_id,
        arrays=wire.encode(adapter, dtype),
        num_examples=result.num_examples,
        metrics={"train_loss": result.mean_loss, "steps": float(result.steps)},
    )


def distributed_share(
    config: ExperimentConfig, adapter: Arrays, received: Arrays, rnd: int, client: int
) -> Arrays:
    """A client's upload under distributed DP: its update clipped, its share of the noise added
    (`GaussianMechanism.noised_upload`, seeded per round and client)."""
    dp = mechanism(config.privacy, config.federation.rounds)
    rng = np.random.default_rng(derive_seed(config.seed, Seed.DP_NOISE, rnd, client))
    return dp.noised_upload(adapter, received, config.federation.num_clients, rng)


def client_sft(
    config: ExperimentConfig,
    client: ClientRuntime,
    examples: Sequence[Encoded],
    rnd: int,
    reporter: Reporter,
    *,
    rounds: int | None = None,
) -> TrainResult:
    """A client's local SFT of its SLM adapter, seeded by round and client so every engine agrees.

    `rounds`: how many rounds this training recurs in, round `rnd` being one of them (default
    `federation.rounds`); `train.lr_schedule = "whole_run"` spreads one schedule over them.
    """
    return train_sft(
        client.slm.model,
        examples,
        pad_id=client.slm.pad_id,
        lr=config.slm.lr,
        cfg=config.train,
        seed=derive_seed(config.seed, Seed.CLIENT_TRAIN, rnd, client.client_id),
        on_step=reporter.step_callback(),
        span=round_span(config, rnd, rounds),
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
    """The server's SFT of its LLM adapter (Centralized, CrossLM), seeded by round.

    It recurs in the `federation.rounds` rounds (for `train.lr_schedule = "whole_run"`).
    """
    assert config.llm is not None
    return train_sft(
        llm.model,
        examples,
        pad_id=llm.pad_id,
        lr=config.llm.lr,
        cfg=config.train,
        seed=derive_seed(config.seed, Seed.LLM_TRAIN, rnd),
        epochs=epochs,
        on_step=reporter.step_callback(),
        weights=weights,
        span=round_span(config, rnd),
    )


def round_span(config: ExperimentConfig, rnd: int, rounds: int | None = None) -> ScheduleSpan:
    """Round `rnd` of a training phase that recurs in `rounds` rounds (default `federation.rounds`)."""
    return ScheduleSpan(rnd, config.federation.rounds if rounds is None else rounds)
