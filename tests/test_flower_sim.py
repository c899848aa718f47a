"""The Flower engine on Flower's simulation engine (Ray), on tiny random models."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.common import bytes_to_ndarray

from fedcollm.algorithms import ALGORITHMS
from fedcollm.algorithms.baselines.fedavg import FedAvg
from fedcollm.config import build_config
from fedcollm.engines import run_experiment
from fedcollm.engines.flower import FlowerOptions
from fedcollm.engines.flower import transport as flower_transport
from fedcollm.lm.lora import get_adapter
from fedcollm.parties.client import ClientRuntime
from fedcollm.parties.data import ExperimentData
from fedcollm.parties.loading import load_models
from fedcollm.protocol import Payload, Reporter
from tests.helpers import (
    assert_no_processes_left,
    event_scalars,
    read_metrics,
    relative_l2,
    saved_adapter,
    tiny_config,
)


def test_simulation_gives_the_embedded_engines_adapters_exactly(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path
) -> None:
    federation = {"rounds": 2, "num_clients": 3}
    cfg = build_config(
        tiny_config(tiny_llama, tiny_llama_big, federation=federation, report_to=["tensorboard"])
    )
    run_experiment(cfg, tmp_path / "embedded")
    run_experiment(cfg, tmp_path / "flower", engine="flower", flower=FlowerOptions(secagg=False))

    embedded, flower = saved_adapter(tmp_path / "embedded"), saved_adapter(tmp_path / "flower")
    assert all(np.array_equal(embedded[k], flower[k]) for k in embedded)
    assert read_metrics(tmp_path / "embedded") == read_metrics(tmp_path / "flower")
    # TensorBoard: the round metrics alike; of the step losses, the server process sees its own only.
    steps = {
        name: event_scalars(tmp_path / name / "tensorboard" / "steps") for name in ("embedded", "flower")
    }
    assert set(steps["flower"]) == {"train/server/loss"}
    assert [v for _, v in steps["flower"]["train/server/loss"]] == [
        v for _, v in steps["embedded"]["train/server/loss"]
    ]
    rounds = [event_scalars(tmp_path / name / "tensorboard" / "rounds") for name in ("embedded", "flower")]
    assert rounds[0] == rounds[1]
    assert (tmp_path / "flower" / ".flwr").is_dir()  # Flower's home inside the run folder
    assert_no_processes_left(tmp_path / "flower" / ".flwr")


def test_secagg_hides_every_upload_and_matches_plain_fedavg(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = build_config(
        tiny_config(tiny_llama, tiny_llama, algorithm="fedavg", federation={"rounds": 1, "num_clients": 3})
    )
    # Each client's round-1 upload, computed here exactly as the clients compute it.
    slm, _ = load_models(cfg, with_llm=False)
    start = get_adapter(slm.model)
    data = ExperimentData.load(cfg)
    algorithm = ALGORITHMS["fedavg"](cfg)
    uploads = [
        algorithm.client_fit(
            ClientRuntime.create(cfg, data, k, slm), Payload(start, {"round": 1}), 1, Reporter()
        )
        for k in range(3)
    ]
    plain = run_experiment(cfg, tmp_path / "plain").out
    plain_mean = saved_adapter(plain)

    received: list = []  # every message the server side receives
    aggregates: list = []  # what the algorithm's server step is given

    original_exchange = flower_transport.PollingGrid.send_and_receive

    def spy_exchange(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = original_exchange(self, messages, timeout=timeout)
        received.extend(replies)
        return replies

    original_update = FedAvg.server_update

    def spy_update(self, server, aggregate, rnd, reporter):  # type: ignore[no-untyped-def]
        aggregates.append({k: v.copy() for k, v in aggregate.items()})
        return original_update(self, server, aggregate, rnd, reporter)

    monkeypatch.setattr(flower_transport.PollingGrid, "send_and_receive", spy_exchange)
    monkeypatch.setattr(FedAvg, "server_update", spy_update)
    out = tmp_path / "secagg"
    run_experiment(cfg, out, engine="flower", flower=FlowerOptions(secagg=True))

    # 1. No message the server received carries a float array; no received array is (or
    #    correlates with) any client's upload: the masked vectors are uniform noise mod 2**32.
    client_vectors = [
        np.concatenate([a.ravel() for a in u.arrays.values()]).astype(np.float64) for u in uploads
    ]
    masked_count = 0
    assert received
    for message in received:
        assert not message.has_error()
        assert all(len(record) == 0 for record in message.content.array_records.values())
        # No training metric either: SecAgg+'s collect stage echoes only the example count.
        assert all(set(record) <= {"num_examples"} for record in message.content.metric_records.values())
        for record in message.content.config_records.values():
            for value in record.values():
                for item in value if isinstance(value, list) else [value]:
                    if not isinstance(item, bytes):
                        continue
                    try:
                        array = bytes_to_ndarray(item)
                    except Exception:
                        continue  # keys and ciphertexts, not arrays
                    assert not np.issubdtype(array.dtype, np.floating)
                    if array.size < 16:
                        continue
                    masked_count += 1
                    flat = array.ravel().astype(np.float64)
                    for vector in client_vectors:
                        for name_array in uploads[0].arrays.values():
                            if name_array.size == flat.size:
                                assert not np.allclose(flat, vector[: flat.size])
                    assert flat.min() >= 0 and flat.max() < 2**32
    assert masked_count >= 3 * len(uploads[0].arrays)  # every client's masked adapter went through
    masked = [bytes_to_ndarray(b).astype(np.float64) for b in _masked_vectors(received)]
    for vector in client_vectors:
        joined = np.concatenate([m.ravel() for m in masked[1 : 1 + len(uploads[0].arrays)]])
        assert abs(np.corrcoef(joined, vector)[0, 1]) < 0.2

    # 2. The server step was given only the aggregate, and it matches plain FedAvg.
    assert len(aggregates) == 1
    assert relative_l2(aggregates[0], plain_mean) < 1e-6
    assert relative_l2(saved_adapter(out), plain_mean) < 1e-3
    # 3. The run record holds no client's training loss, only the example-weighted mean SecAgg+
    #    unmasked, and no dropouts.
    lines = read_metrics(out)
    losses = [m for m in lines if m["metric"] == "train_loss"]
    assert [(m["round"], m["role"], m["client"]) for m in losses] == [(1, "client", None)]
    total = sum(u.num_examples for u in uploads)
    want = sum(u.metrics["train_loss"] * u.num_examples for u in uploads) / total
    assert losses[0]["value"] == pytest.approx(want, abs=1e-5)
    assert not [m for m in lines if m["metric"] == "dropped_out"]
    assert_no_processes_left(out / ".flwr")


def _masked_vectors(messages: list) -> list[bytes]:
    """The masked parameter vector of the first client reply of SecAgg+'s collect stage."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    for message in messages:
        configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and Key.MASKED_PARAMETERS in configs:
            return list(configs[Key.MASKED_PARAMETERS])
    raise AssertionError("no masked vector among the received messages")


@pytest.mark.slow
def test_a_failing_client_stops_the_run_with_its_error_and_leaves_no_process(
    tiny_llama: Path, tmp_path: Path
) -> None:
    from fedcollm.engines.flower import FlowerEngineError

    # A folder that names a model (so the pre-flight check passes) but holds no weights: the
    # client fails only when it loads, inside Flower.
    broken = tmp_path / "model-without-weights"
    broken.mkdir()
    shutil.copy(tiny_llama / "config.json", broken / "config.json")
    missing = str(broken)
    cfg = build_config(
        tiny_config(
            tiny_llama,
            tiny_llama,
            algorithm="fedavg",
            federation={"rounds": 1, "num_clients": 3, "client_models": [str(tiny_llama)] * 2 + [missing]},
        )
    )
    out = tmp_path / "run"
    with pytest.raises(
        FlowerEngineError, match=r"only 2 client\(s\).*client 2: cannot load .*model-without-weights"
    ):
        run_experiment(cfg, out, engine="flower", flower=FlowerOptions(min_clients=3))
    assert_no_processes_left(out / ".flwr")
