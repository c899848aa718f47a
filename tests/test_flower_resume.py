"""Resuming on Flower the algorithms whose clients keep state between rounds (Standalone, FedMKT,
CrossLM): each SuperNode checkpoints its client's state with every round on its own disk, so a
ServerApp that dies mid-round resumes to the same final adapters and records as a run that never
stopped, also when a SuperNode was killed and restarted meanwhile (its state comes back from its
disk, not from memory). Slow (Ray, and processes per message); CI runs it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from fedcollm.config import build_config
from fedcollm.engines import run_experiment
from fedcollm.engines.flower import FlowerEngineError, FlowerOptions
from fedcollm.engines.flower.deploy import LocalFederation
from fedcollm.engines.flower.transport import FlowerTransport
from tests.helpers import ALGORITHM_CONFIGS, Interrupted, TinyModels, assert_no_processes_left, read_metrics

pytestmark = pytest.mark.slow


def _adapters(out: Path) -> dict[str, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    return {
        str(path.parent.relative_to(out)): load_file(path)
        for path in sorted((out / "adapters").rglob("adapter_model.safetensors"))
    }


def _assert_same_run(out: Path, reference: Path) -> None:
    expected, got = _adapters(reference), _adapters(out)
    assert expected and sorted(got) == sorted(expected)
    for role, arrays in expected.items():
        assert all(np.array_equal(arrays[k], got[role][k]) for k in arrays), role
    assert read_metrics(out) == read_metrics(reference)


def _config(models: TinyModels, name: str, rounds: int) -> dict:
    data = ALGORITHM_CONFIGS[name](models)
    data["federation"] = {**data["federation"], "rounds": rounds, "num_clients": 2}
    return data


@pytest.mark.parametrize("name", ["standalone", "fedmkt", "crosslm"])
def test_a_simulation_stopped_mid_round_resumes_like_a_run_that_never_stopped(
    tiny_models: TinyModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    cfg = build_config(_config(tiny_models, name, rounds=2))
    run_experiment(cfg, tmp_path / "embedded")
    options = FlowerOptions(secagg=False)
    exchange = FlowerTransport._exchange

    def dies_after_round_2_updates(self: FlowerTransport, payload, rnd, **kwargs):  # type: ignore[no-untyped-def]
        results = exchange(self, payload, rnd, **kwargs)
        if rnd == 2:  # the clients have trained and checkpointed round 2; the server never hears it
            raise Interrupted("ServerApp gone in round 2")
        return results

    with monkeypatch.context() as patch:
        patch.setattr(FlowerTransport, "_exchange", dies_after_round_2_updates)
        with pytest.raises(Interrupted, match="ServerApp gone"):
            run_experiment(cfg, tmp_path / "simulation", engine="flower", flower=options)
    assert not (tmp_path / "simulation" / "results.md").exists()
    run_experiment(cfg, tmp_path / "simulation", engine="flower", flower=options, resume=True)
    _assert_same_run(tmp_path / "simulation", tmp_path / "embedded")


def _wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_a_deployment_whose_serverapp_is_killed_mid_round_resumes_also_after_a_supernode_restart(
    tiny_models: TinyModels, tmp_path: Path
) -> None:
    data = _config(tiny_models, "standalone", rounds=3)
    cfg = build_config(data)
    run_experiment(cfg, tmp_path / "embedded")
    experiment = tmp_path / "experiment.toml"
    experiment.write_text(cfg.to_toml(), encoding="utf-8")
    out = tmp_path / "deployment"
    run_config = {"experiment": experiment, "out": out, "secagg": False, "min-clients": 2}

    federation = LocalFederation(tmp_path / "federation", 2, tls=False)
    node_home = tmp_path / "federation" / ".flwr" / "supernode-0"
    try:
        federation.start()
        first = federation.submit(run_config)
        # Client 0 has trained round 2 and checkpointed it on its node: the round is under way.
        _wait_for(lambda: any(node_home.rglob("round-0002")), 600, "client 0's round-2 checkpoint")
        serverapps = federation.serverapp_pids()
        assert serverapps, "no ServerApp process found"
        for pid in serverapps:
            os.kill(pid, signal.SIGKILL)
        assert not (out / "results.md").exists()
        # The other SuperNode dies too and comes back: whatever it held in memory is gone.
        federation.kill_supernode(1)
        federation.start_supernode(1)
        with contextlib.suppress(FlowerEngineError):  # the SuperLink may have ended it already
            federation.flwr("stop", str(first), "fedcollm")
        resumed = federation.submit({**run_config, "resume": True})
        status = federation.wait(resumed, timeout=900)
        assert status.ok, federation.run_log(resumed)
        log = federation.run_log(resumed)
    finally:
        federation.stop()
    assert federation.leftover_pids() == []
    assert_no_processes_left(tmp_path / "federation" / ".flwr" / "superlink")
    assert "after round 1" in log, log
    _assert_same_run(out, tmp_path / "embedded")
