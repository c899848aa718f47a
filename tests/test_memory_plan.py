"""The memory plan: each device's estimated peak, and a run that cannot fit refused before loading.

The paper configs are planned for device lists given here (their models' shapes are known
offline, `fedcollm.experiment.shapes`), so the decisions are the same on any machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcollm.config import load_config
from fedcollm.engines import run_experiment
from fedcollm.experiment import memory
from fedcollm.experiment.memory import MemoryPlanError
from fedcollm.experiment.plan import plan
from fedcollm.lm import precision
from tests.helpers import ALGORITHM_CONFIGS, TinyModels

GIB = 1024**3
PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"


@pytest.fixture(autouse=True)
def _bf16_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "_cuda_bfloat16", lambda: True)  # an Ampere-or-later GPU


def _memory(
    config_name: str, overrides: list[str], devices: list[str], capacities: dict[str, int]
) -> dict[str, str]:
    lines = plan(load_config(PAPER / config_name, overrides), devices=devices, capacities=capacities)
    return {line.label: line.value for line in lines}


def test_the_s1_setting_fits_one_16gb_gpu_and_the_plan_says_where_each_model_sits() -> None:
    lines = _memory("s1.toml", [], ["cuda:0", "cpu"], {"cuda:0": 16 * GIB, "cpu": 64 * GIB})
    assert lines["llm on"] == "cuda:0 in bfloat16 (auto)" and lines["slm on"] == "cuda:0 in bfloat16 (auto)"
    assert "of 16.00 GiB" in lines["memory cuda:0"] and "does not fit" not in lines["memory cuda:0"]


def test_a_7b_llm_in_bfloat16_is_refused_on_a_24gb_gpu_naming_quantisation_first() -> None:
    with pytest.raises(MemoryPlanError, match=r'on cuda:0, which has 24\.00 GiB.*llm\.quantization = "4bit"'):
        _memory("s3.toml", [], ["cuda:0", "cpu"], {"cuda:0": 24 * GIB, "cpu": 64 * GIB})


def test_the_levers_it_names_make_the_7b_setting_fit_the_same_gpu() -> None:
    levers = ['llm.quantization="4bit"', "train.gradient_checkpointing=true"]
    lines = _memory("s3.toml", levers, ["cuda:0", "cpu"], {"cuda:0": 24 * GIB, "cpu": 64 * GIB})
    assert "does not fit" not in lines["memory cuda:0"]
    assert lines["llm on"] == "cuda:0 in bfloat16 (auto), weights 4bit"


def test_models_on_different_devices_are_planned_on_each() -> None:
    lines = _memory(
        "s2.toml",
        ['llm.device="cuda:1"', 'slm.device="cuda:0"', 'llm.quantization="4bit"'],
        ["cuda:0", "cuda:1", "cpu"],
        {"cuda:0": 80 * GIB, "cuda:1": 80 * GIB, "cpu": 64 * GIB},
    )
    assert "llm " in lines["memory cuda:1"] and "slm " not in lines["memory cuda:1"]
    assert "slm " in lines["memory cuda:0"] and "llm " not in lines["memory cuda:0"]


def test_4bit_weights_are_about_a_quarter_of_bfloat16_ones() -> None:
    from fedcollm.experiment.shapes import known_config
    from fedcollm.experiment.sizes import adapter_size

    cfg = load_config(PAPER / "s3.toml")
    assert cfg.llm is not None
    shape_config = known_config(cfg.llm.name)
    assert shape_config is not None
    shape = memory.model_shape(shape_config, adapter_size(shape_config, cfg.llm.lora).adapter_params)
    assert shape.linear_params + shape.other_params == pytest.approx(6.74e9, rel=0.01)  # LLaMa2-7B
    full = memory.model_memory(cfg, cfg.llm, "llm", shape, "cuda:0", 4)
    nf4 = memory.model_memory(
        cfg, cfg.llm.model_copy(update={"quantization": "4bit"}), "llm", shape, "cuda:0", 4
    )
    assert full.weights == pytest.approx(2 * 6.74e9, rel=0.01)
    assert 0.2 < nf4.weights / full.weights < 0.35  # NF4 linears + float32 embeddings
    assert not any("quantization" in lever for lever in nf4.levers)


def test_checkpointing_shrinks_the_activations_it_plans() -> None:
    cfg = load_config(PAPER / "s1.toml")
    on = load_config(PAPER / "s1.toml", ["train.gradient_checkpointing=true"])
    shape = memory.ModelShape(1, 1, 1, hidden=1280, ffn=5120, layers=36, heads=20, vocab=50257)
    assert cfg.llm is not None
    plain = memory.model_memory(cfg, cfg.llm, "llm", shape, "cuda:0", 4)
    checkpointed = memory.model_memory(on, cfg.llm, "llm", shape, "cuda:0", 4)
    assert checkpointed.activations < plain.activations / 5


def test_a_run_that_cannot_fit_stops_before_it_loads_a_model_or_claims_its_folder(
    tiny_models: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedcollm.config import build_config
    from fedcollm.parties import loading

    monkeypatch.setattr(memory, "device_capacity", lambda device: 1024)  # a 1 KiB device
    loaded: list[str] = []
    monkeypatch.setattr(loading, "load_with_lora", lambda *a, **k: loaded.append("x"))
    with pytest.raises(MemoryPlanError, match="pull a lever"):
        run_experiment(build_config(ALGORITHM_CONFIGS["fedcollm"](tiny_models)), tmp_path / "run")
    assert loaded == [] and not (tmp_path / "run").exists()


def test_the_cli_dry_run_prints_the_memory_of_each_device(tiny_models: TinyModels, tmp_path: Path) -> None:
    import tomli_w
    from typer.testing import CliRunner

    from fedcollm.cli import app

    config = tmp_path / "tiny.toml"
    config.write_text(tomli_w.dumps(ALGORITHM_CONFIGS["fedcollm"](tiny_models)))
    result = CliRunner().invoke(app, ["run", str(config), "--dry-run", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "memory cpu:" in result.output and "slm on: cpu" in result.output
