"""The contract every registered algorithm keeps, tested for each one (peft's matrix over methods).

An algorithm registered without a tiny config in `tests.helpers.ALGORITHM_CONFIGS` fails
`test_every_registered_algorithm_has_a_tiny_config`; with one, it runs through all of these:
a dry run refuses exactly what a run refuses, a run crashed mid-round and resumed ends where an
uninterrupted one does, the same seed gives the same run, and a poisoned upload is rejected
and named without stopping the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedcollm.engines.local as local_engine
from fedcollm.algorithms import ALGORITHMS
from fedcollm.config import ALGORITHM_NAMES, ExperimentConfig, build_config
from fedcollm.engines import run_experiment
from fedcollm.errors import FedcollmError
from fedcollm.experiment.checkpoint import CHECKPOINT_DIR
from fedcollm.experiment.plan import plan
from fedcollm.experiment.setup import prepare_server
from fedcollm.protocol import ClientReply, Payload, Reporter
from tests.helpers import (
    ALGORITHM_CONFIGS,
    Interrupted,
    TinyModels,
    crash_clients_in_round,
    read_metrics,
    run_files,
)

REGISTERED = sorted(ALGORITHMS)


def config_of(name: str, models: TinyModels, **overrides: Any) -> ExperimentConfig:
    data = ALGORITHM_CONFIGS[name](models)
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
        else:
            data[section] = values
    return build_config(data)


def test_the_config_names_exactly_the_registered_algorithms() -> None:
    assert sorted(ALGORITHM_NAMES) == REGISTERED


def test_every_registered_algorithm_has_a_tiny_config() -> None:
    assert sorted(ALGORITHM_CONFIGS) == REGISTERED


# ------------------------------------------------------------------------------ dry run == run

BROKEN: dict[str, dict[str, Any]] = {
    "no auxiliary set": {"task": {"aux_fraction": 0.0}},
    "no llm": {"llm": None},
    "held-out task is the training task": {"crosslm": {"heldout_task": "arc_easy"}},
    "fedavg of mixed clients": {"fedmkt": {"fedavg_homogeneous": True}},
    "an auxiliary set too small to hold a question": {"task": {"train_limit": 3, "aux_fraction": 0.1}},
    "a model name that cannot load": {"slm": {"name": "tiny-model-that-is-not-there"}},
}


@pytest.mark.parametrize("case", sorted(BROKEN))
@pytest.mark.parametrize("name", REGISTERED)
def test_the_dry_run_refuses_exactly_what_the_run_refuses(
    name: str, case: str, tiny_models: TinyModels, tmp_path: Path
) -> None:
    config = config_of(name, tiny_models, **BROKEN[case])
    try:
        plan(config)
    except FedcollmError as exc:
        planned: str | None = str(exc)
    else:
        planned = None
    out = tmp_path / "run"
    try:
        prepare_server(config, out, overwrite=False, reporter=Reporter())
    except FedcollmError as exc:
        started: str | None = str(exc)
    else:
        started = None
    assert planned == started
    if started is not None:
        assert not out.exists(), "a refused run must not claim its run folder"


# ------------------------------------------------------------------------------ resume


def _crash(monkeypatch: pytest.MonkeyPatch, name: str, config: ExperimentConfig) -> None:
    """Crash in the middle of round 2 (clients' step if the algorithm has one, else the server's),
    or, for an algorithm without rounds, in its first evaluation."""
    cls = ALGORITHMS[name]
    rounds = cls(config).num_rounds()
    if rounds == 0:

        def crash_evaluating(*args: object) -> None:
            raise Interrupted("crash in the first evaluation")

        monkeypatch.setattr(cls, "evaluate", crash_evaluating)
        return
    crash_round = min(2, rounds)
    if cls.uses_clients:
        crash_clients_in_round(monkeypatch, crash_round)
        return
    original = cls.server_update

    def crash(self, server, aggregate, rnd, reporter):  # type: ignore[no-untyped-def]
        if rnd == crash_round:
            raise Interrupted(f"crash in round {rnd}")
        return original(self, server, aggregate, rnd, reporter)

    monkeypatch.setattr(cls, "server_update", crash)


@pytest.mark.parametrize("name", REGISTERED)
def test_a_run_crashed_mid_round_and_resumed_equals_an_uninterrupted_run(
    name: str, tiny_models: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_of(name, tiny_models)
    run_experiment(config, tmp_path / "straight")
    crashed = tmp_path / "crashed"
    with monkeypatch.context() as patch:
        _crash(patch, name, config)
        with pytest.raises(Interrupted):
            run_experiment(config, crashed)
    assert not (crashed / "results.md").exists()
    if ALGORITHMS[name](config).num_rounds() >= 2:
        assert sorted(p.name for p in (crashed / CHECKPOINT_DIR).iterdir()) == ["round-0000", "round-0001"]
    run_experiment(config, crashed, resume=True)
    assert run_files(crashed) == run_files(tmp_path / "straight")

    again = tmp_path / "again"  # the same seed, a fresh run: the same run folder
    run_experiment(config, again)
    assert run_files(again) == run_files(tmp_path / "straight")


@pytest.mark.parametrize("name", REGISTERED)
def test_every_evaluation_leaves_per_question_records_that_give_its_accuracy(
    name: str, tiny_models: TinyModels, tmp_path: Path
) -> None:
    """Each evaluated (round, role, client) of metrics.jsonl has a records file, one line per
    evaluation question in order, whose recomputed acc and acc_norm are the metrics'."""
    from fedcollm.evaluation.records import read_question_sets
    from fedcollm.parties.data import ExperimentData

    config = config_of(name, tiny_models)
    out = tmp_path / "run"
    run_experiment(config, out)
    questions = [r.id for r in ExperimentData.load(config).eval_requests(config)]
    sets = {(s.round, s.role, s.client, s.set): s for s in read_question_sets(out)}
    accs = [m for m in read_metrics(out) if m["metric"] == "acc"]
    per_client = {(m["round"], m["role"]) for m in accs if m["client"] is not None}
    # Where clients' models were scored one by one, their mean (client None) has no records.
    evaluated = {
        (m["round"], m["role"], m["client"]): m["value"]
        for m in accs
        if m["client"] is not None or (m["round"], m["role"]) not in per_client
    }
    assert evaluated, "the run evaluated nothing"
    assert {(rnd, role, client) for rnd, role, client, kind in sets if kind == "eval"} == set(evaluated)
    norm = {
        (m["round"], m["role"], m["client"]): m["value"]
        for m in read_metrics(out)
        if m["metric"] == "acc_norm"
    }
    for (rnd, role, client, kind), qset in sets.items():
        if kind != "eval":
            continue
        assert [q.id for q in qset.questions] == questions
        assert qset.acc == pytest.approx(evaluated[(rnd, role, client)], abs=1e-12)
        assert qset.acc_norm == pytest.approx(norm[(rnd, role, client)], abs=1e-12)

    # results.md pairs each model's last round with its round 0 on these records: Δ is the change
    # of the (client-mean) accuracy that the table above it shows.
    results = (out / "results.md").read_text()
    last = max(m["round"] for m in accs)
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")]
        for line in (results.split("After round")[1] if "After round" in results else "").splitlines()
        if line.startswith(("| SLM |", "| LLM |"))
    }
    mean = {
        (m["round"], m["role"], m["metric"]): m["value"] for m in read_metrics(out) if m["client"] is None
    }
    expected = {role for rnd, role, _ in evaluated if rnd == 0} if last > 0 else set()
    assert set(rows) == {role.upper() for role in expected}
    for role in expected:
        cells = rows[role.upper()]
        assert cells[1] == str(len(questions))
        for key, at in (("acc", 2), ("acc_norm", 6)):
            change = 100 * (mean[(last, role, key)] - mean[(0, role, key)])
            assert float(cells[at]) == pytest.approx(change, abs=0.051)


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name", REGISTERED)
def test_a_poisoned_upload_is_rejected_named_and_the_run_goes_on(
    name: str, tiny_models: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_of(name, tiny_models, federation={"rounds": 1})
    if not ALGORITHMS[name].uses_clients:
        # Nothing to poison: the algorithm never asks a client for an upload, as this shows.
        class NoUploads(local_engine.InProcessTransport):
            def fit(self, payload: Payload, rnd: int) -> list[ClientReply]:
                raise AssertionError(f"{name} asked the clients for an upload")

        monkeypatch.setattr(local_engine, "InProcessTransport", NoUploads)
        run_experiment(config, tmp_path / "run")
        assert not any(m["role"] == "client" for m in read_metrics(tmp_path / "run"))
        return

    class OnePoisoned(local_engine.InProcessTransport):
        def fit(self, payload: Payload, rnd: int) -> list[ClientReply]:
            replies = super().fit(payload, rnd)
            if rnd == 1:
                poisoned = replies[1].arrays
                for key, value in poisoned.items():
                    if np.issubdtype(value.dtype, np.floating):
                        poisoned[key] = value * np.asarray(np.nan, dtype=value.dtype)
            return replies

    monkeypatch.setattr(local_engine, "InProcessTransport", OnePoisoned)
    out = tmp_path / "run"
    run_experiment(config, out)
    rejected = [(m["round"], m["client"]) for m in read_metrics(out) if m["metric"] == "rejected"]
    assert rejected == [(1, 1)]
    assert (out / "results.md").is_file()
    assert all(np.isfinite(m["value"]) for m in read_metrics(out)), "no NaN reaches the record"
