"""Devices: what a `device` setting means here, and every tensor on its model's device.

A CPU-only machine cannot show a tensor created off its model's device (everything is on the
CPU), so `tests.device_guard.HostTensorGuard` makes fedcollm's own constructions without a
`device=` fail here, over an end-to-end run of every registered algorithm.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcollm.config import ConfigError, build_config
from fedcollm.engines import run_experiment
from fedcollm.lm import devices, precision
from fedcollm.lm.devices import DeviceError, resolve_device
from tests.device_guard import SOURCE, HostTensorGuard
from tests.helpers import ALGORITHM_CONFIGS, TinyModels, read_metrics


@pytest.mark.parametrize("algorithm", sorted(ALGORITHM_CONFIGS))
def test_every_algorithm_runs_with_device_cpu_and_names_the_device_of_every_tensor_it_makes(
    algorithm: str, tiny_models: TinyModels, tmp_path: Path
) -> None:
    data = ALGORITHM_CONFIGS[algorithm](tiny_models)
    data["device"] = "cpu"
    data["federation"] = {**data["federation"], "rounds": 1}
    guard = HostTensorGuard()
    with guard:
        run_experiment(build_config(data), tmp_path / "run")
    assert guard.problems == [], "\n".join(sorted(set(guard.problems)))
    assert any(m["metric"] == "acc" for m in read_metrics(tmp_path / "run"))


def test_the_guard_catches_a_tensor_fedcollm_makes_without_a_device() -> None:
    # Code compiled under a file name of fedcollm's source runs as fedcollm's own code would.
    forgetful = compile(
        "ids = torch.zeros(3, dtype=torch.long)\narr = ids.numpy()\nback = torch.from_numpy(arr)",
        str(SOURCE / "training" / "forgetful.py"),
        "exec",
    )
    careful = compile(
        "ids = torch.zeros(3, dtype=torch.long, device=d)\narr = devices.to_numpy(ids)\n"
        "back = devices.from_numpy(arr, d)",
        str(SOURCE / "training" / "careful.py"),
        "exec",
    )
    guard = HostTensorGuard()
    with guard:
        torch.zeros(3)  # a test's own constructions are not watched
        exec(careful, {"torch": torch, "devices": devices, "d": torch.device("cpu")})
        assert guard.problems == []
        exec(forgetful, {"torch": torch})
    assert guard.problems == [
        "fedcollm/training/forgetful.py:1: torch.zeros without device=",
        "fedcollm/training/forgetful.py:2: torch.numpy (use fedcollm.lm.devices)",
        "fedcollm/training/forgetful.py:3: torch.from_numpy (use fedcollm.lm.devices)",
    ]


def test_auto_is_the_cpu_on_a_machine_without_accelerators_and_cuda_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"llm\.device = 'cuda'.*no CUDA device 0.*devices here: cpu"):
        resolve_device("cuda", "llm.device")
    with pytest.raises(DeviceError, match="MPS is not available"):
        resolve_device("mps")


def test_auto_prefers_cuda_and_a_cuda_index_past_the_machine_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert devices.available_devices() == ["cuda:0", "cuda:1", "mps", "cpu"]
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"device = 'cuda:2'.*cuda:0, cuda:1, mps, cpu"):
        resolve_device("cuda:2")


@pytest.mark.parametrize(
    ("key", "value"),
    [("device", "gpu"), ("device", "cuda:x"), ("slm.device", "tpu"), ("llm.device", "cuda0")],
)
def test_a_device_fedcollm_cannot_name_is_refused_with_its_key(key: str, value: str) -> None:
    from fedcollm.config import load_config

    with pytest.raises(ConfigError, match=re.escape(f"{key}: unknown device '{value}'")):
        load_config(None, [f"{key}={value}"])


def test_a_node_device_places_every_model_of_the_node(tiny_models: TinyModels) -> None:
    from fedcollm.config import with_device

    data = ALGORITHM_CONFIGS["fedcollm"](tiny_models)
    data["slm"] = {**data["slm"], "device": "cuda:3"}
    config = with_device(build_config(data), "cpu", "node config device")
    assert config.device == "cpu" and config.slm.device is None and config.llm is not None
    assert config.llm.device is None
    with pytest.raises(ConfigError, match="node config device: unknown device 'gpu0'"):
        with_device(config, "gpu0", "node config device")


def test_a_model_on_a_missing_device_stops_the_run_before_anything_trains(
    tiny_models: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = ALGORITHM_CONFIGS["fedcollm"](tiny_models)
    data["llm"] = {**data["llm"], "device": "cuda:1"}
    with pytest.raises(DeviceError, match=r"llm\.device = 'cuda:1'"):
        run_experiment(build_config(data), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or read_metrics(tmp_path / "run") == []


def test_auto_dtype_is_chosen_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(precision, "_cuda_bfloat16", lambda: True)
    assert precision.torch_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(precision, "_cuda_bfloat16", lambda: False)
    assert precision.torch_dtype("auto", cuda) == torch.float16  # pre-Ampere: float16, loss-scaled
    assert precision.needs_loss_scaling(precision.torch_dtype("auto", cuda))
    assert precision.torch_dtype("auto", torch.device("mps")) == torch.float32
    monkeypatch.setattr(precision, "native_bfloat16", lambda: False)
    assert precision.torch_dtype("auto", torch.device("cpu")) == torch.float32
    assert precision.dtype_warning("float16", torch.device("cpu")) is not None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    assert "Tesla V100" in str(precision.dtype_warning("bfloat16", cuda))
    assert precision.dtype_warning("auto", cuda) is None


def test_adapters_cross_to_numpy_through_the_host() -> None:
    values = torch.arange(6, dtype=torch.float32, device="cpu").reshape(2, 3).requires_grad_()
    out = devices.to_numpy(values * 2)
    assert isinstance(out, np.ndarray) and out.tolist() == [[0, 2, 4], [6, 8, 10]]
    back = devices.from_numpy(out, torch.device("cpu"))
    assert back.device.type == "cpu" and torch.equal(back, values.detach() * 2)


def test_a_gpu_share_in_simulation_needs_a_gpu_and_is_never_negative(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcollm.engines.flower.options import FlowerOptions, FlowerOptionsError
    from fedcollm.engines.flower.simulation import simulation_gpus

    assert simulation_gpus(FlowerOptions()) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FlowerOptionsError, match=r"gpus-per-client=0\.25: this machine has no CUDA GPU"):
        simulation_gpus(FlowerOptions(gpus_per_client=0.25))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert simulation_gpus(FlowerOptions(gpus_per_client=0.25)) == 2
    with pytest.raises(FlowerOptionsError, match="gpus-per-client must not be negative"):
        FlowerOptions(gpus_per_client=-1.0)
    assert FlowerOptions.from_run_config({"gpus-per-client": "0.5"}).gpus_per_client == 0.5


def test_the_cli_refuses_a_device_this_machine_lacks_by_its_option(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from fedcollm.cli import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(
        app, ["eval", "--model", str(tiny_llama), "--task", "arc_easy", "--limit", "2", "--device", "cuda:0"]
    )
    assert result.exit_code == 2
    assert "--device = 'cuda:0': this machine has no CUDA device 0" in result.output
    ok = CliRunner().invoke(
        app, ["eval", "--model", str(tiny_llama), "--task", "arc_easy", "--limit", "2", "--device", "cpu"]
    )
    assert ok.exit_code == 0, ok.output
    assert '"device": "cpu"' in ok.output
