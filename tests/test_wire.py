"""Adapters travelling in float16/bfloat16: half the bytes, bounded rounding, float32 aggregation."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedcollm.algorithms.baselines.fedavg import FedAvg
from fedcollm.config import build_config
from fedcollm.engines import run_experiment
from fedcollm.federation import wire
from fedcollm.protocol import ClientReply, Reporter
from tests.helpers import tiny_config


def _adapter(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "a.lora_A.weight": rng.normal(0, 0.05, (4, 32)).astype(np.float32),
        "a.lora_B.weight": rng.normal(0, 1e-3, (32, 4)).astype(np.float32),
    }


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_encoding_halves_the_bytes_and_rounds_within_the_bound(dtype: str) -> None:
    arrays = _adapter(0)
    sent = wire.encode(arrays, dtype)
    assert list(sent) == list(arrays)
    assert all(sent[k].nbytes * 2 == arrays[k].nbytes for k in arrays)
    back = wire.decode(sent, dtype)
    bound = wire.ROUNDTRIP_RELATIVE_ERROR[dtype]
    # Below float16's normal range (6.1e-5) its spacing is fixed at 2**-24: half of it absolute.
    floor = 2.0**-25 if dtype == "float16" else 0.0
    for name, value in arrays.items():
        assert back[name].dtype == np.float32 and back[name].shape == value.shape
        assert np.all(np.abs(back[name] - value) <= bound * np.abs(value) + floor)
        again = wire.decode(wire.encode({name: back[name]}, dtype), dtype)[name]
        np.testing.assert_array_equal(again, back[name])  # rounding is idempotent


def test_bfloat16_bits_match_torch_and_keep_specials() -> None:
    import torch

    values = np.array([1.0, -2.5, 1e-3, 3.0e38, np.inf, -np.inf, 0.0], dtype=np.float32)
    bits = wire.encode_bfloat16(values)
    assert bits.dtype == np.uint16
    expected = torch.from_numpy(values).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(wire.decode_bfloat16(bits), expected)
    assert np.isnan(wire.decode_bfloat16(wire.encode_bfloat16(np.array([np.nan], np.float32))))[0]


def test_float32_passes_through_and_float16_refuses_out_of_range_values() -> None:
    arrays = _adapter(1)
    assert all(wire.encode(arrays, "float32")[k] is arrays[k] for k in arrays)
    with pytest.raises(ValueError, match="float16's range"):
        wire.encode({"x": np.array([7e4], dtype=np.float32)}, "float16")
    assert wire.decode(wire.encode({"x": np.array([7e4], np.float32)}, "bfloat16"), "bfloat16")["x"][0] > 6e4


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_uploads_are_decoded_before_screening_and_aggregated_in_float32(tiny_llama: Path, dtype: str) -> None:
    config = build_config(
        tiny_config(tiny_llama, tiny_llama, algorithm="fedavg", federation={"transport_dtype": dtype})
    )
    algorithm = FedAvg(config)
    start = _adapter(2)
    server = SimpleNamespace(global_adapter=start)
    payload = algorithm.configure_fit(server, 1, Reporter())  # type: ignore[arg-type]
    assert all(a.nbytes * 2 == start[k].nbytes for k, a in payload.arrays.items())
    uploads = [{k: v + 0.01 * (c + 1) for k, v in start.items()} for c in range(3)]
    replies = [ClientReply(c, algorithm.to_wire(u), num_examples=c + 1) for c, u in enumerate(uploads)]
    accepted, rejected = algorithm.screen_fit(server, payload, replies, 1)  # type: ignore[arg-type]
    assert not rejected and len(accepted) == 3
    assert all(a.dtype == np.float32 for r in accepted for a in r.arrays.values())
    aggregate = algorithm.aggregate_fit(server, accepted, 1)  # type: ignore[arg-type]
    bound = wire.ROUNDTRIP_RELATIVE_ERROR[dtype]
    for name in start:
        assert aggregate[name].dtype == np.float32
        exact = sum((c + 1) * uploads[c][name].astype(np.float64) for c in range(3)) / 6
        assert np.all(np.abs(aggregate[name] - exact) <= bound * np.abs(exact).max() + 1e-6)


def test_a_float16_run_sends_half_the_bytes_and_ends_near_the_float32_run(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path
) -> None:
    comm, adapters = {}, {}
    for dtype in ("float32", "float16"):
        overrides = {"federation": {"rounds": 2, "num_clients": 2, "transport_dtype": dtype}}
        config = build_config(tiny_config(tiny_llama, tiny_llama_big, **overrides))
        out = tmp_path / dtype
        recorder = run_experiment(config, out)
        comm[dtype] = json.loads((out / "communication.json").read_text())
        from safetensors.numpy import load_file

        adapters[dtype] = load_file(out / "adapters" / "slm" / "adapter_model.safetensors")
        assert recorder.metrics
    for full, half in zip(comm["float32"]["rounds"], comm["float16"]["rounds"], strict=True):
        assert half["up_params"] == full["up_params"] and half["down_params"] == full["down_params"]
        assert 2 * half["up_bytes"] == full["up_bytes"] and 2 * half["down_bytes"] == full["down_bytes"]
    assert 2 * comm["float16"]["total_bytes"] == comm["float32"]["total_bytes"]
    assert all(a.dtype == np.float32 for a in adapters["float16"].values())
    diff = sum(float(np.sum((adapters["float16"][k] - v) ** 2)) for k, v in adapters["float32"].items())
    norm = sum(float(np.sum(v**2)) for v in adapters["float32"].values())
    assert diff / norm < 1e-4


def test_flower_simulation_moves_bfloat16_adapters_like_the_embedded_engine(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """The conversion lives in the algorithm's hooks: Flower carries the uint16 views unchanged,
    ends at the embedded engine's adapter bit for bit, and its ledger counts half the bytes.
    Under SecAgg+ clients hold their adapter decoded, so the secure mean is the plain one."""
    from safetensors.numpy import load_file

    from fedcollm.engines.flower import FlowerOptions

    federation = {"rounds": 1, "num_clients": 3, "transport_dtype": "bfloat16"}
    config = build_config(tiny_config(tiny_llama, tiny_llama, algorithm="fedavg", federation=federation))
    runs = {
        "embedded": {},
        "flower": {"engine": "flower", "flower": FlowerOptions(secagg=False)},
        "secagg": {"engine": "flower", "flower": FlowerOptions(secagg=True)},
    }
    adapters, comm = {}, {}
    for name, options in runs.items():
        run_experiment(config, tmp_path / name, **options)  # type: ignore[arg-type]
        adapters[name] = load_file(tmp_path / name / "adapters" / "slm" / "adapter_model.safetensors")
        comm[name] = json.loads((tmp_path / name / "communication.json").read_text())
    assert all(np.array_equal(adapters["embedded"][k], adapters["flower"][k]) for k in adapters["embedded"])
    assert comm["flower"]["rounds"] == comm["embedded"]["rounds"]
    entry = comm["embedded"]["rounds"][0]
    assert entry["down_bytes"] == 2 * entry["down_params"] and entry["up_bytes"] == 2 * entry["up_params"]
    diff = sum(float(np.sum((adapters["secagg"][k] - v) ** 2)) for k, v in adapters["embedded"].items())
    norm = sum(float(np.sum(v**2)) for v in adapters["embedded"].values())
    assert diff / norm < 1e-6  # SecAgg+'s quantisation only
