"""End-to-end runs of the embedded engine on tiny random models."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from peft import PeftModel

from fedcollm.config import build_config
from fedcollm.engines import run_experiment
from fedcollm.experiment.recording import RunFolderError
from fedcollm.lm.loading import load_base_model
from fedcollm.lm.lora import get_adapter
from tests.helpers import read_metrics, tiny_config


def test_two_round_two_client_fedcollm_run_writes_a_complete_run_folder(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path
) -> None:
    cfg = build_config(tiny_config(tiny_llama, tiny_llama_big))
    out = tmp_path / "run"
    run_experiment(cfg, out)

    assert tomllib.loads((out / "config.toml").read_text())["federation"]["rounds"] == 2
    metrics = read_metrics(out)
    assert {"round", "role", "client", "metric", "value"} <= set(metrics[0])
    for role in ("slm", "llm"):
        rounds = sorted({m["round"] for m in metrics if m["role"] == role and m["metric"] == "acc"})
        assert rounds == [0, 1, 2]
    client_losses = [m for m in metrics if m["role"] == "client" and m["metric"] == "train_loss"]
    assert sorted((m["round"], m["client"]) for m in client_losses) == [
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 1),
    ]
    assert any(m["metric"] == "distill_kd" for m in metrics)

    comm = json.loads((out / "communication.json").read_text())
    adapter = sum(
        v.size
        for v in get_adapter(
            PeftModel.from_pretrained(load_base_model(str(tiny_llama)), str(out / "adapters" / "slm"))
        ).values()
    )
    assert comm["adapter_params"] == adapter
    assert [r["up_params"] for r in comm["rounds"]] == [2 * adapter, 2 * adapter]
    assert comm["rounds"][0]["down_bytes"] == 2 * adapter * 4
    assert 0 < comm["adapter_share_percent"] < 100

    for role in ("slm", "llm"):
        assert (out / "adapters" / role / "adapter_config.json").is_file()
    results = (out / "results.md").read_text()
    assert "| SLM |" in results and "| LLM |" in results


def test_same_seed_gives_the_same_adapters_and_metrics(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path
) -> None:
    cfg = build_config(tiny_config(tiny_llama, tiny_llama_big, federation={"rounds": 1, "num_clients": 2}))
    run_experiment(cfg, tmp_path / "a")
    run_experiment(cfg, tmp_path / "b")
    base = load_base_model(str(tiny_llama))
    a = get_adapter(PeftModel.from_pretrained(base, str(tmp_path / "a" / "adapters" / "slm")))
    base = load_base_model(str(tiny_llama))
    b = get_adapter(PeftModel.from_pretrained(base, str(tmp_path / "b" / "adapters" / "slm")))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert read_metrics(tmp_path / "a") == read_metrics(tmp_path / "b")


def test_fedavg_has_no_llm_and_no_server_training(tiny_llama: Path, tmp_path: Path) -> None:
    cfg = build_config(
        tiny_config(tiny_llama, tiny_llama, algorithm="fedavg", federation={"rounds": 1, "num_clients": 2})
    )
    run_experiment(cfg, tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    assert not any(m["role"] == "llm" for m in metrics)
    assert not any(m["metric"].startswith("distill") for m in metrics)


def test_existing_run_folder_is_not_overwritten_silently(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text("name = 'other'\n")
    cfg = build_config(tiny_config(tiny_llama, tiny_llama_big))
    with pytest.raises(RunFolderError, match="different experiment"):
        run_experiment(cfg, out)
    assert (out / "config.toml").read_text() == "name = 'other'\n"


def test_fedcollm_broadcasts_the_distilled_adapter_not_the_plain_average(
    tiny_llama: Path, tiny_llama_big: Path
) -> None:
    from fedcollm.algorithms import ALGORITHMS
    from fedcollm.parties.client import ClientRuntime
    from fedcollm.parties.data import ExperimentData
    from fedcollm.parties.loading import load_models
    from fedcollm.parties.server import ServerRuntime
    from fedcollm.protocol import Reporter

    cfg = build_config(tiny_config(tiny_llama, tiny_llama_big, federation={"rounds": 1, "num_clients": 2}))
    algorithm = ALGORITHMS["fedcollm"](cfg)
    data = ExperimentData.load(cfg)
    slm, llm = load_models(cfg, with_llm=True)
    server = ServerRuntime.create(cfg, data, slm, llm)
    clients = [ClientRuntime.create(cfg, data, k, slm) for k in range(2)]
    payload = algorithm.configure_fit(server, 1, Reporter())
    replies = [algorithm.client_fit(c, payload, 1, Reporter()) for c in clients]
    aggregate = algorithm.aggregate_fit(server, replies, 1)
    llm_before = get_adapter(llm.model)
    algorithm.server_update(server, aggregate, 1, Reporter())
    following = algorithm.configure_fit(server, 2, Reporter()).arrays
    assert following.keys() == server.global_adapter.keys()
    assert all(np.array_equal(following[k], server.global_adapter[k]) for k in following)
    assert any(not np.array_equal(following[k], aggregate[k]) for k in aggregate)  # distillation moved it
    assert any(not np.array_equal(llm_before[k], v) for k, v in get_adapter(llm.model).items())
