"""FedMKT, CrossLM and Standalone on Flower: the same adapters and records on every engine.

Each algorithm runs on the embedded engine, in Flower's simulation and in a real deployment (a
SuperLink and two SuperNodes as processes on 127.0.0.1), without secure aggregation, and the
three runs must agree bit for bit: every saved adapter and every metrics line. Two rounds, so
what a client keeps between rounds (Standalone's own adapter, FedMKT's knowledge-trained SLM)
has to survive Flower's node state. Slow (processes); CI runs it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedcollm.config import build_config
from fedcollm.engines import run_experiment
from fedcollm.engines.flower import FlowerOptions
from fedcollm.engines.flower.deploy import LocalFederation
from tests.helpers import ALGORITHM_CONFIGS, TinyModels, assert_no_processes_left, read_metrics

pytestmark = pytest.mark.slow

ALGORITHMS = ("fedmkt", "crosslm", "standalone")


def _adapters(out: Path) -> dict[str, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    return {
        str(path.parent.relative_to(out)): load_file(path)
        for path in sorted((out / "adapters").rglob("adapter_model.safetensors"))
    }


def test_fedmkt_crosslm_and_standalone_agree_on_the_embedded_engine_in_simulation_and_deployment(
    tiny_models: TinyModels, tmp_path: Path
) -> None:
    experiments = {}
    for name in ALGORITHMS:
        data = ALGORITHM_CONFIGS[name](tiny_models)
        data["federation"] = {**data["federation"], "rounds": 2, "num_clients": 2}
        data["name"] = f"flower-{name}"
        cfg = build_config(data)
        experiments[name] = tmp_path / f"{name}.toml"
        experiments[name].write_text(cfg.to_toml(), encoding="utf-8")
        run_experiment(cfg, tmp_path / name / "embedded")
        run_experiment(
            cfg, tmp_path / name / "simulation", engine="flower", flower=FlowerOptions(secagg=False)
        )

    federation = LocalFederation(tmp_path / "federation", 2, tls=False)
    try:
        federation.start()
        for name in ALGORITHMS:
            run_id = federation.submit(
                {"experiment": experiments[name], "out": tmp_path / name / "deployment", "secagg": False}
            )
            federation.wait(run_id, timeout=900)
    finally:
        federation.stop()
    assert federation.leftover_pids() == []
    assert_no_processes_left(tmp_path / "federation" / ".flwr" / "superlink")
    # The ClientApps were forked by each SuperNode's warm executor, not started by Flower.
    assert "ClientApp executor" in (tmp_path / "federation" / "logs" / "supernode-0.log").read_text()

    for name in ALGORITHMS:
        embedded = _adapters(tmp_path / name / "embedded")
        assert embedded, f"{name}: no adapters saved"
        for engine in ("simulation", "deployment"):
            other = _adapters(tmp_path / name / engine)
            assert sorted(other) == sorted(embedded), (name, engine)
            for role, arrays in embedded.items():
                assert all(np.array_equal(arrays[k], other[role][k]) for k in arrays), (name, engine, role)
            assert read_metrics(tmp_path / name / engine) == read_metrics(tmp_path / name / "embedded"), (
                name,
                engine,
            )
