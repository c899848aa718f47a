"""Checkpoints: atomic, verified, tied to their experiment, pickle-free."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import fedcollm.experiment.checkpoint as ckpt
from fedcollm.experiment.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fedcollm.experiment.state import StateError


def _state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "global_adapter": {
            "a": rng.normal(size=(2, 3)).astype(np.float32),
            "b": np.arange(4, dtype=np.float32),
        },
        "clients": {0: {"adapter": {"a": rng.normal(size=2).astype(np.float32)}}, 1: {}},
        "counts": [1, 2.5, "x", None, True],
    }


def _equal(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_state_round_trips_exactly(tmp_path: Path) -> None:
    state = _state(0)
    folder = save_checkpoint(tmp_path, Checkpoint(3, "key", state, {"metrics": [1]}, rng_state()))
    loaded = load_checkpoint(folder, "key")
    assert loaded.round == 3 and loaded.record == {"metrics": [1]}
    assert _equal(loaded.state, state)


def test_rng_states_are_restored() -> None:
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_checkpoint_of_another_experiment_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, Checkpoint(1, "key-a", _state(0), {}, rng_state()))
    with pytest.raises(CheckpointError, match="another experiment"):
        latest_checkpoint(tmp_path, "key-b")


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, Checkpoint(1, "k", _state(1), {}, rng_state()))
    newest = save_checkpoint(tmp_path, Checkpoint(2, "k", _state(2), {}, rng_state()))
    with (newest / "arrays.npz").open("r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00garbage\x00")
    found, notes = latest_checkpoint(tmp_path, "k")
    assert found is not None and found.round == 1
    assert "checksum mismatch" in notes[0]
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(newest, "k")


def test_keep_last_deletes_older_checkpoints(tmp_path: Path) -> None:
    for r in range(1, 5):
        save_checkpoint(tmp_path, Checkpoint(r, "k", _state(r), {}, rng_state()), keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-0003", "round-0004"]


def test_a_disk_that_fills_up_while_saving_leaves_the_previous_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, Checkpoint(1, "k", _state(1), {}, rng_state()))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.np, "savez", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path, Checkpoint(2, "k", _state(2), {}, rng_state()))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["round-0001"]  # no half-written folder
    found, notes = latest_checkpoint(tmp_path, "k")
    assert found is not None and found.round == 1 and notes == []


def test_unstorable_state_is_named(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="bad/x holds a object"):
        save_checkpoint(tmp_path, Checkpoint(1, "k", {"bad": {"x": object()}}, {}, rng_state()))
