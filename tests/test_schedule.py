"""`train.lr_schedule`: warmup and linear decay per round (the default) or once over the whole run."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from fedcollm.config import LoraConfig, TrainConfig, build_config
from fedcollm.engines import run_experiment
from fedcollm.lm.encoding import encode_pair
from fedcollm.lm.models import load_with_lora
from fedcollm.training import optimise as optimise_module
from fedcollm.training.optimise import ONE_ROUND, ScheduleSpan
from fedcollm.training.sft import train_sft
from tests.helpers import ALGORITHM_CONFIGS, TinyModels

LR = 1e-3
TEXTS = [("Question: Plants need?\nAnswer:", " light"), ("The sun is", " a star")] * 2
"""Four examples: four optimiser steps of batch 1 per epoch."""


class Recorded:
    """What every `make_optimizer` call built: its span, and the rate each optimiser step used."""

    def __init__(self) -> None:
        self.spans: list[ScheduleSpan] = []
        self.rates: list[list[float]] = []


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Recorded:
    record = Recorded()
    real = optimise_module.make_optimizer
    parameters = inspect.signature(real)

    def recording(*args: Any, **kwargs: Any) -> Any:
        bound = parameters.bind(*args, **kwargs)
        bound.apply_defaults()
        optimizer, scheduler = real(*args, **kwargs)
        record.spans.append(bound.arguments["span"])
        rates: list[float] = []
        record.rates.append(rates)
        advance = scheduler.step

        def recorded_advance(*a: Any, **k: Any) -> Any:
            rates.append(optimizer.param_groups[0]["lr"])  # the rate the step just taken applied
            return advance(*a, **k)

        scheduler.step = recorded_advance  # type: ignore[method-assign]
        return optimizer, scheduler

    monkeypatch.setattr(optimise_module, "make_optimizer", recording)
    return record


def train_rounds(
    tiny_llama: Path, record: Recorded, cfg: TrainConfig, spans: list[ScheduleSpan], epochs: int = 1
) -> list[list[float]]:
    """One `train_sft` call per span on a tiny LoRA model; the rate of each call's every step."""
    lm = load_with_lora(str(tiny_llama), LoraConfig(r=2, dropout=0.0), seed=0)
    examples = [encode_pair(lm.tokenizer, c, a) for c, a in TEXTS]
    start = len(record.rates)
    for span in spans:
        train_sft(lm.model, examples, pad_id=0, lr=LR, cfg=cfg, seed=span.round, epochs=epochs, span=span)
    return record.rates[start:]


def test_the_whole_run_schedule_over_three_rounds_is_one_continuous_warmup_and_decay(
    tiny_llama: Path, recorded: Recorded
) -> None:
    cfg = TrainConfig(batch_size=1, warmup_ratio=0.25, lr_schedule="whole_run")
    rounds = train_rounds(tiny_llama, recorded, cfg, [ScheduleSpan(r, 3) for r in (1, 2, 3)])
    assert [len(r) for r in rounds] == [4, 4, 4]
    # One schedule of 12 steps: warmup over round(0.25 * 12) = 3 steps, then decay toward zero.
    expected = [LR * (s + 1) / 3 for s in range(3)] + [LR * (12 - s) / 9 for s in range(3, 12)]
    whole = [rate for call in rounds for rate in call]
    assert whole == pytest.approx(expected, rel=1e-12)
    # ... the very rates of one call over all twelve steps (three epochs of the same four examples).
    (continuous,) = train_rounds(
        tiny_llama, recorded, cfg.model_copy(update={"lr_schedule": "per_round"}), [ONE_ROUND], epochs=3
    )
    assert whole == pytest.approx(continuous, rel=1e-12)
    assert rounds[1][0] < LR and rounds[2][-1] == pytest.approx(LR / 9)  # no warmup after round 1


def test_per_round_keeps_todays_schedule_in_every_round_whatever_the_span(
    tiny_llama: Path, recorded: Recorded
) -> None:
    cfg = TrainConfig(batch_size=1, warmup_ratio=0.25)
    assert cfg.lr_schedule == "per_round"
    explicit = cfg.model_copy(update={"lr_schedule": "per_round"})
    rounds = train_rounds(tiny_llama, recorded, explicit, [ScheduleSpan(r, 3) for r in (1, 2, 3)])
    # Every round: warmup over round(0.25 * 4) = 1 step, then (4 - s) / 3 down toward zero.
    today = [LR * 1.0, LR * 3 / 3, LR * 2 / 3, LR * 1 / 3]
    assert rounds == [pytest.approx(today, rel=1e-12)] * 3
    assert train_rounds(tiny_llama, recorded, cfg, [ONE_ROUND]) == [pytest.approx(today, rel=1e-12)]


def test_a_span_outside_its_rounds_is_refused() -> None:
    with pytest.raises(ValueError, match="round 3 of 2"):
        ScheduleSpan(3, 2)
    with pytest.raises(ValueError, match="round 0 of 2"):
        ScheduleSpan(0, 2)


EXPECTED_SPANS: dict[str, set[tuple[int, int]]] = {
    "fedavg": {(1, 2), (2, 2)},
    "standalone": {(1, 2), (2, 2)},
    "centralized": {(1, 2), (2, 2)},
    "fedcollm": {(1, 2), (2, 2)},  # local SFT and the server's distillation
    "fedmkt": {(1, 2), (2, 2)},  # ClientUpdate1, the LLM's L2, and ClientUpdate2 one round later
    "crosslm": {(1, 3), (2, 3), (3, 3)},  # the clients' SFT, the closing round too (+ the LLM's)
}
"""The spans each algorithm's trainers run in over T = 2 rounds."""


@pytest.mark.parametrize("algorithm", sorted(EXPECTED_SPANS))
def test_every_trainer_of_every_algorithm_knows_its_round_in_the_run(
    algorithm: str, tiny_models: TinyModels, tmp_path: Path, recorded: Recorded
) -> None:
    data = ALGORITHM_CONFIGS[algorithm](tiny_models)
    data["train"] = {**data["train"], "lr_schedule": "whole_run"}
    data["eval"] = {**data["eval"], "every_round": False}
    run_experiment(build_config(data), tmp_path / "run")
    seen = {(span.round, span.rounds) for span in recorded.spans}
    if algorithm == "crosslm":  # the LLM trains in rounds 1..T when a candidate is selected
        assert EXPECTED_SPANS[algorithm] <= seen <= EXPECTED_SPANS[algorithm] | {(1, 2), (2, 2)}
    else:
        assert seen == EXPECTED_SPANS[algorithm]
