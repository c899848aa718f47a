"""Building blocks the algorithms share: the standard local update, the SFT steps of clients
and of the server's LLM, and the evaluation of one model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedcollm.config import ExperimentConfig
from fedcollm.evaluation.multiple_choice import evaluate
from fedcollm.federation import wire
from fedcollm.lm.encoding import Encoded
from fedcollm.lm.lora import get_adapter, set_adapter
from fedcollm.lm.models import LoadedModel
from fedcollm.parties.client import ClientRuntime
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


def evaluate_role(
    config: ExperimentConfig,
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
        batch_size=config.eval.batch_size,
        on_batch=lambda b, total: reporter.advance(b, total),
    )
    return [Metric(rnd, role, client, key, value) for key, value in result.summary().items()]


def train_client_adapter(
    config: ExperimentConfig, client: ClientRuntime, payload: Payload, rnd: int, reporter: Reporter
) -> ClientReply:
    """The standard local update: start from the payload's adapter, train E epochs, send it back.

    The payload's adapter arrives and the reply's leaves in `federation.transport_dtype`.
    """
    dtype = config.federation.transport_dtype
    set_adapter(client.slm.model, wire.decode(payload.arrays, dtype))
    reporter.phase(f"round {rnd} · client {client.client_id} training", None)
    result = client_sft(config, client, client.train, rnd, reporter)
    return ClientReply(
        client=client.client_id,
        arrays=wire.encode(get_adapter(client.slm.model), dtype),
        num_examples=result.num_examples,
        metrics={"train_loss": result.mean_loss, "steps": float(result.steps)},
    )


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
