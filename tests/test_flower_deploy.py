"""Flower's deployment engine: a real SuperLink and SuperNodes as separate processes on 127.0.0.1.

Slow (processes, and tiny models trained in them); CI runs them. The three-way test lets Flower's
SuperExec start every ClientApp (`warm_clientapps=False`); the others, like `fedcollm deploy`,
fork them from the warm executor beside each SuperNode (`clientapp_executor`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from fedcollm.config import build_config
from fedcollm.engines import run_experiment
from fedcollm.engines.flower import FlowerOptions
from fedcollm.engines.flower.deploy import LocalFederation
from tests.helpers import assert_no_processes_left, read_metrics, relative_l2, saved_adapter, tiny_config

pytestmark = pytest.mark.slow


def write_config(path: Path, data: dict) -> Path:
    path.write_text(build_config(data).to_toml(), encoding="utf-8")
    return path


def test_embedded_simulation_and_deployment_give_the_same_adapters(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path
) -> None:
    data = tiny_config(tiny_llama, tiny_llama_big, federation={"rounds": 2, "num_clients": 3})
    cfg = build_config(data)
    experiment = write_config(tmp_path / "experiment.toml", data)
    run_experiment(cfg, tmp_path / "embedded")
    run_experiment(cfg, tmp_path / "simulation", engine="flower", flower=FlowerOptions(secagg=False))
    run_experiment(cfg, tmp_path / "simulation-secagg", engine="flower", flower=FlowerOptions(secagg=True))

    federation = LocalFederation(tmp_path / "federation", 3, tls=True, warm_clientapps=False)
    try:
        federation.start()
        for name, secagg in (("deployment", False), ("deployment-secagg", True)):
            run_id = federation.submit(
                {"experiment": experiment, "out": tmp_path / name, "secagg": secagg, "min-clients": 3}
            )
            federation.wait(run_id, timeout=900)
    finally:
        federation.stop()
    assert federation.leftover_pids() == []
    assert_no_processes_left(tmp_path / "federation" / ".flwr" / "superlink")
    assert "ClientApp executor" not in (tmp_path / "federation" / "logs" / "supernode-0.log").read_text()

    embedded = saved_adapter(tmp_path / "embedded")
    for name in ("simulation", "deployment"):
        other = saved_adapter(tmp_path / name)
        assert all(np.array_equal(embedded[k], other[k]) for k in embedded), name
        assert read_metrics(tmp_path / name) == read_metrics(tmp_path / "embedded"), name
    for name in ("simulation-secagg", "deployment-secagg"):
        assert relative_l2(saved_adapter(tmp_path / name), embedded) < 1e-3, name


def test_a_supernode_killed_mid_round_does_not_stop_the_run(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path
) -> None:
    experiment = write_config(
        tmp_path / "experiment.toml",
        tiny_config(
            tiny_llama,
            tiny_llama_big,
            federation={"rounds": 2, "num_clients": 3},
            eval={"limit": 8, "batch_size": 16, "every_round": False},
        ),
    )
    out = tmp_path / "run"
    # TLS and SuperNode authentication on, SecAgg+ on (the deployment default).
    federation = LocalFederation(tmp_path / "federation", 3, tls=True, auth=True)
    try:
        federation.start()
        run_id = federation.submit({"experiment": experiment, "out": out})
        victim = federation.supernodes[2]
        deadline = time.monotonic() + 600
        # Kill client 2's SuperNode once round 1's SecAgg+ has begun (its first `train` message).
        while "Receiving: train message" not in victim.log.read_text(errors="replace"):
            assert time.monotonic() < deadline, "round 1 never reached SecAgg+"
            assert federation.status(run_id).status != "finished:failed"
            time.sleep(0.5)
        federation.kill_supernode(2)
        federation.wait(run_id, timeout=900)
    finally:
        federation.stop()
    assert federation.leftover_pids() == []

    lines = read_metrics(out)
    dropped = sorted((m["round"], m["client"]) for m in lines if m["metric"] == "dropped_out")
    assert dropped == [(1, 2), (2, 2)]
    # Under SecAgg+ the record holds each round's mean training loss, over the clients in it.
    trained = [(m["round"], m["client"], m["note"]) for m in lines if m["metric"] == "train_loss"]
    over = "example-weighted mean over clients 0, 1 (secure aggregation)"
    assert trained == [(1, None, over), (2, None, over)]
    assert (out / "adapters" / "slm" / "adapter_config.json").is_file()
    assert "| SLM |" in (out / "results.md").read_text()
