"""Configuration: defaults, TOML loading, overrides and the errors users see."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedcollm.config import ConfigError, ExperimentConfig, build_config, load_config

ROOT = Path(__file__).resolve().parents[1]


SHIPPED = sorted((ROOT / "configs").rglob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name


@pytest.mark.parametrize("setting", ["s1", "s2", "s3"])
def test_paper_settings_plan_offline_with_four_clients_and_the_four_tasks(
    setting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedcollm.experiment.plan import plan
    from fedcollm.lm import precision

    monkeypatch.setattr(precision, "_cuda_bfloat16", lambda: True)
    cfg = load_config(ROOT / "configs" / "paper" / f"{setting}.toml")
    assert cfg.federation.num_clients == 4
    assert sorted(cfg.compare.tasks) == ["arc_challenge", "arc_easy", "commonsense_qa", "openbookqa"]
    # Planned for an 80 GB GPU, what the papers' settings need (they do not fit this CPU).
    gpu = {"cuda:0": 80 * 2**30, "cpu": 128 * 2**30}
    lines = plan(cfg, cfg.compare.methods, cfg.compare.tasks, devices=list(gpu), capacities=gpu)
    values = {line.label: line.value for line in lines}
    assert (
        "/" in values["slm"] and "M params" in values["slm"] and "M params" in values["llm"]
    )  # shapes known offline
    assert values["rounds"] == str(cfg.federation.rounds)
    assert "of 80.00 GiB" in values["memory cuda:0"]


def test_unknown_key_suggests_the_closest_valid_name() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown key 'federation.round'.*did you mean 'federation.rounds'"
    ):
        build_config({"federation": {"round": 2}})
    with pytest.raises(ConfigError, match=r"did you mean 'distill'"):
        build_config({"distil": {}})


def test_wrong_type_and_range_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"federation.rounds.*got 'three'"):
        build_config({"federation": {"rounds": "three"}})
    with pytest.raises(ConfigError, match=r"task.aux_fraction"):
        build_config({"task": {"aux_fraction": 1.5}})


def test_unknown_algorithm_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown algorithm 'fedprox'.*fedavg.*fedcollm"):
        build_config({"algorithm": "fedprox"})


def test_overrides_are_parsed_as_toml_values(tmp_path: Path) -> None:
    cfg = load_config(None, ["federation.rounds=5", "distill.kd_weight=0.5", "slm.name=foo/bar"])
    assert cfg.federation.rounds == 5
    assert cfg.distill.kd_weight == 0.5
    assert cfg.slm.name == "foo/bar"
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["federation.rounds"])


def test_resolved_config_round_trips_through_toml() -> None:
    cfg = ExperimentConfig()
    again = build_config(tomllib.loads(cfg.to_toml()))
    assert again == cfg
    assert again.eval_split == "test"  # ARC-Easy, the default task: lm-eval's split for it


@pytest.mark.parametrize(
    ("task", "split"),
    [
        ("arc_easy", "test"),
        ("arc_challenge", "test"),
        ("openbookqa", "test"),
        ("commonsense_qa", "validation"),
    ],
)
def test_evaluation_defaults_to_where_lm_eval_scores_the_task(task: str, split: str) -> None:
    assert build_config({"task": {"name": task}}).eval_split == split
    chosen = build_config({"task": {"name": task, "eval_split": "train"}})
    assert chosen.eval_split == chosen.eval.split == "train"


def test_a_comparison_task_takes_its_own_default_split_unless_one_was_set() -> None:
    from fedcollm.experiment.plan import variant

    base = build_config({"task": {"name": "arc_easy"}})
    assert variant(base, "commonsense_qa", "fedavg").eval_split == "validation"
    fixed = build_config({"task": {"name": "arc_easy", "eval_split": "train"}})
    assert variant(fixed, "commonsense_qa", "fedavg").eval_split == "train"


def test_missing_and_broken_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 2")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_config(bad)


def test_configuration_reference_matches_the_code() -> None:
    from fedcollm.config_doc import reference_markdown

    documented = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    hint = "regenerate: python -m fedcollm.config_doc > docs/configuration.md"
    assert documented == reference_markdown(), hint


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        ({"avx512_bf16": True, "amx_bf16": False}, "bfloat16"),
        ({"avx512_bf16": False, "amx_bf16": True}, "bfloat16"),
        ({"avx512_bf16": False, "amx_bf16": False}, "float32"),
        ({}, "float32"),  # a CPU torch reports nothing about (e.g. ARM)
    ],
)
def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it_natively(
    capabilities: dict[str, bool], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from fedcollm.lm.precision import dtype_text, torch_dtype

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert ExperimentConfig().dtype == "auto"
    assert torch_dtype("auto") == getattr(torch, expected)
    assert dtype_text("auto") == f"{expected} (auto)"
    assert torch_dtype("float32") == torch.float32 and dtype_text("bfloat16") == "bfloat16"
