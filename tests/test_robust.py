"""Server-side checks on uploads and robust aggregation."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedcollm.algorithms import check_config
from fedcollm.config import ConfigError, ExperimentConfig, build_config
from fedcollm.federation.aggregate import weighted_mean
from fedcollm.federation.robust import (
    AGGREGATORS,
    check_upload,
    coordinate_median,
    screen_uploads,
    trimmed_mean,
)
from fedcollm.protocol import ClientReply

EXPECTED = {"a.lora_A": np.zeros((2, 3), np.float32), "a.lora_B": np.zeros((3, 2), np.float32)}


def _honest(client: int, seed: int, n: int = 10) -> ClientReply:
    rng = np.random.default_rng(seed)
    arrays = {k: (v + rng.normal(scale=0.01, size=v.shape)).astype(np.float32) for k, v in EXPECTED.items()}
    return ClientReply(client, arrays, n)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda a: {**a, "a.lora_A": a["a.lora_A"].astype(np.float64)}, "dtype float64"),
        (lambda a: {**a, "a.lora_A": np.zeros((3, 3), np.float32)}, "shape"),
        (lambda a: {k: v for k, v in a.items() if k != "a.lora_B"}, "names differ"),
        (lambda a: {**a, "extra": np.zeros(1, np.float32)}, "names differ"),
        (lambda a: {**a, "a.lora_B": np.full((3, 2), np.nan, np.float32)}, "NaN or Inf"),
        (lambda a: {**a, "a.lora_B": np.full((3, 2), np.inf, np.float32)}, "NaN or Inf"),
    ],
)
def test_each_kind_of_malformed_upload_is_rejected_named_and_survived(mutate, reason) -> None:
    bad = _honest(2, 2)
    bad = ClientReply(bad.client, mutate(bad.arrays), bad.num_examples)
    replies = [_honest(0, 0), _honest(1, 1), bad, _honest(3, 3)]
    accepted, rejected = screen_uploads(replies, EXPECTED, EXPECTED, norm_multiple=10)
    assert [r.client for r in accepted] == [0, 1, 3]
    assert [r.client for r in rejected] == [2]
    assert reason in rejected[0].reason


def test_non_positive_example_count_is_rejected() -> None:
    reply = _honest(0, 0, n=0)
    assert "example count" in check_upload(reply, EXPECTED)


def test_an_update_far_outside_the_others_is_rejected_as_an_outlier() -> None:
    huge = ClientReply(4, {k: v + 1000.0 for k, v in _honest(4, 4).arrays.items()}, 10)
    replies = [_honest(k, k) for k in range(4)] + [huge]
    accepted, rejected = screen_uploads(replies, EXPECTED, EXPECTED, norm_multiple=10)
    assert [r.client for r in rejected] == [4] and "median" in rejected[0].reason
    assert len(accepted) == 4
    _, none = screen_uploads(replies, EXPECTED, EXPECTED, norm_multiple=0)  # check disabled
    assert none == []


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_robust_aggregation_defeats_one_client_sending_a_huge_update(rule: str) -> None:
    honest = [_honest(k, k) for k in range(4)]
    attacker = ClientReply(9, {k: np.full(v.shape, 1e6, np.float32) for k, v in EXPECTED.items()}, 10)
    poisoned_mean = weighted_mean([*honest, attacker])
    robust = AGGREGATORS[rule]([*honest, attacker], 0.2)
    clean = weighted_mean(honest)
    for name in EXPECTED:
        assert np.abs(poisoned_mean[name]).max() > 1e5  # the mean is ruined
        assert np.abs(robust[name] - clean[name]).max() < 0.05  # the robust rule is not


def test_trimmed_mean_refuses_to_trim_everything() -> None:
    with pytest.raises(ValueError, match="leaves no value"):
        trimmed_mean([_honest(0, 0), _honest(1, 1)], trim_fraction=0.5)


def test_median_of_identical_uploads_is_that_upload() -> None:
    same = [_honest(k, 7) for k in range(3)]
    out = coordinate_median(same)
    for name in EXPECTED:
        np.testing.assert_array_equal(out[name], same[0].arrays[name])


arrays_strategy = st.tuples(
    st.sampled_from([np.float32, np.float64, np.float16, np.int32]),
    st.sampled_from([(2, 3), (3, 2), (3, 3), (6,)]),
).flatmap(lambda spec: hnp.arrays(dtype=spec[0], shape=spec[1]))  # default elements include NaN/Inf


@settings(max_examples=200, deadline=None)
@given(
    a=arrays_strategy,
    b=arrays_strategy,
    drop=st.booleans(),
    n=st.integers(min_value=-2, max_value=5),
)
def test_validator_accepts_exactly_the_well_formed_uploads(a, b, drop, n) -> None:
    arrays = {"a.lora_A": a} if drop else {"a.lora_A": a, "a.lora_B": b}
    reason = check_upload(ClientReply(0, arrays, n), EXPECTED)
    well_formed = (
        not drop
        and all(x.dtype in (np.float32, np.float16) for x in (a, b))
        and a.shape == (2, 3)
        and b.shape == (3, 2)
        and np.isfinite(a).all()
        and np.isfinite(b).all()
        and n > 0
    )
    assert (reason is None) == well_formed


def test_a_run_rejects_a_bad_upload_names_the_client_and_goes_on(
    tiny_llama, tiny_llama_big, tmp_path, monkeypatch
):
    import json

    import fedcollm.algorithms.baselines.fedavg as fedavg
    from fedcollm.config import build_config
    from fedcollm.engines import run_experiment
    from tests.helpers import tiny_config

    original = fedavg.train_client_adapter

    def poisoned(algorithm, client, payload, rnd, reporter):
        reply = original(algorithm, client, payload, rnd, reporter)
        if client.client_id == 1:
            reply.arrays = {k: np.full_like(v, np.nan) for k, v in reply.arrays.items()}
        return reply

    monkeypatch.setattr(fedavg, "train_client_adapter", poisoned)
    cfg = build_config(tiny_config(tiny_llama, tiny_llama_big, algorithm="fedavg"))
    run_experiment(cfg, tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rejected = [m for m in lines if m["metric"] == "rejected"]
    assert [(m["round"], m["client"]) for m in rejected] == [(1, 1), (2, 1)]
    assert "NaN" in rejected[0]["note"]
    assert any(m["round"] == 2 and m["metric"] == "acc" for m in lines)  # the run went on

    from fedcollm.experiment.loop import RoundError

    strict = build_config(
        tiny_config(tiny_llama, tiny_llama_big, algorithm="fedavg", robustness={"min_clients": 2})
    )
    with pytest.raises(RoundError, match=r"1 of 2 uploads accepted.*client 1: .*NaN"):
        run_experiment(strict, tmp_path / "strict")


# ------------------------------------------------------------------------------------------
# Under secure aggregation the server sees no upload: what needs one is refused before the run.

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("robustness", "key"),
    [
        ({"aggregation": "median"}, "robustness.aggregation"),
        ({"aggregation": "trimmed_mean"}, "robustness.aggregation"),
        ({"norm_multiple": 5.0}, "robustness.norm_multiple"),
        ({"norm_multiple": 10.0}, "robustness.norm_multiple"),  # the plain default, asked for explicitly
    ],
)
@pytest.mark.parametrize("algorithm", ["fedavg", "fedcollm"])
def test_secure_aggregation_refuses_what_needs_every_upload_naming_the_key(
    robustness: dict[str, object], key: str, algorithm: str
) -> None:
    config = build_config({"algorithm": algorithm, "robustness": robustness})
    check_config(config)  # with the uploads in view, the same setting stands
    with pytest.raises(ConfigError, match=rf"with secure aggregation \(SecAgg\+\):\n  - {re.escape(key)} = "):
        check_config(config, secure_aggregation=True)


def test_the_default_robustness_stands_under_secure_aggregation() -> None:
    # norm_multiple unset = auto: screening at 10 x the median where the server sees uploads,
    # off under SecAgg+ (where it cannot be done); 0 says off explicitly.
    default = ExperimentConfig()
    assert default.robustness.norm_multiple is None and default.robustness.screening_multiple == 10.0
    for algorithm in ("fedavg", "fedcollm"):
        check_config(build_config({"algorithm": algorithm}), secure_aggregation=True)
        check_config(
            build_config({"algorithm": algorithm, "robustness": {"norm_multiple": 0}}),
            secure_aggregation=True,
        )
    # FedMKT's uploads never go through SecAgg+ (its aggregate is not a mean): nothing to refuse.
    check_config(
        build_config({"algorithm": "fedmkt", "robustness": {"aggregation": "median"}}),
        secure_aggregation=True,
    )


def test_the_dry_run_and_every_run_start_refuse_it_before_anything_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import fedcollm.engines.flower.deploy as deploy
    from fedcollm.cli import app
    from fedcollm.engines.flower import FlowerOptions
    from fedcollm.engines.flower.simulation import run_simulation
    from fedcollm.experiment.plan import plan
    from fedcollm.experiment.setup import prepare_server
    from fedcollm.protocol import Reporter

    median = build_config(
        {"name": "m", "slm": {"name": "no-such-model"}, "robustness": {"aggregation": "median"}}
    )
    with pytest.raises(ConfigError, match=r"robustness\.aggregation"):
        plan(median, secure_aggregation=True)
    with pytest.raises(ConfigError, match=r"robustness\.aggregation"):
        run_simulation(median, tmp_path / "sim", FlowerOptions(secagg=True))  # before Ray starts
    with pytest.raises(ConfigError, match=r"robustness\.aggregation"):  # the ServerApp's start
        prepare_server(
            median, tmp_path / "served", overwrite=False, reporter=Reporter(), secure_aggregation=True
        )
    assert not (tmp_path / "sim").exists() and not (tmp_path / "served").exists()

    smoke = str(ROOT / "configs" / "smoke.toml")
    runner = CliRunner()
    refused = runner.invoke(
        app,
        [
            "run",
            smoke,
            "--engine",
            "flower",
            "--secagg",
            "--dry-run",
            "--set",
            "robustness.aggregation='median'",
        ],
    )
    assert refused.exit_code != 0 and "robustness.aggregation" in refused.output
    assert "Traceback" not in refused.output
    plain = runner.invoke(
        app, ["run", smoke, "--engine", "flower", "--dry-run", "--set", "robustness.aggregation='median'"]
    )
    assert plain.exit_code == 0, plain.output
    secure = runner.invoke(app, ["run", smoke, "--engine", "flower", "--secagg", "--dry-run"])
    assert secure.exit_code == 0, secure.output

    started: list[dict] = []

    def fake_deploy(*args, **kwargs):  # type: ignore[no-untyped-def]
        started.append(kwargs["options"])
        raise ConfigError("stopped before starting a federation")

    monkeypatch.setattr(deploy, "deploy_experiment", fake_deploy)
    norm = ["--set", "robustness.norm_multiple=5", "--out", str(tmp_path / "d")]
    refused = runner.invoke(app, ["deploy", smoke, *norm])  # SecAgg+ is on by default there
    assert refused.exit_code != 0 and "robustness.norm_multiple" in refused.output and started == []
    runner.invoke(app, ["deploy", smoke, "--no-secagg", *norm])
    assert started == [{"secagg": False}]


def test_a_secure_round_records_only_the_metric_means_and_still_needs_min_clients(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from fedcollm.errors import RoundError
    from fedcollm.experiment import loop
    from fedcollm.protocol import SecureAggregate

    result = SecureAggregate(
        arrays={},
        num_examples=12,
        replies=[ClientReply(0, {}, 5), ClientReply(2, {}, 7)],
        metrics={"train_loss": 1.5, "steps": 3.0},
    )
    lines = loop._secure_metrics(result, 2)
    assert [(m.round, m.role, m.client, m.metric, m.value) for m in lines] == [
        (2, "client", None, "train_loss", 1.5),
        (2, "client", None, "steps", 3.0),
    ]
    assert lines[0].note == "example-weighted mean over clients 0, 2 (secure aggregation)"
    strict = SimpleNamespace(config=build_config({"robustness": {"min_clients": 3}}))
    with pytest.raises(RoundError, match=r"holds 2 client\(s\), fewer than robustness\.min_clients=3"):
        loop._require_secure(strict, result, 2, SimpleNamespace(out=tmp_path))  # type: ignore[arg-type]
    loop._require_secure(SimpleNamespace(config=build_config({})), result, 2, SimpleNamespace(out=tmp_path))  # type: ignore[arg-type]
