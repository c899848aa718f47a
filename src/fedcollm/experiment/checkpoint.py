"""Atomic per-round checkpoints of everything a run needs to continue bit for bit.

A checkpoint is a folder `checkpoints/round-NNNN/` with `arrays.npz` (every array: the global SLM
adapter, the LLM adapter, algorithm state of the server and of each in-process client) and
`meta.json` (round reached, the experiment's key, random-number generator states, metrics and
communication so far, the layout of the arrays, and the SHA-256 of `arrays.npz`). It is written
into a temporary folder and renamed into place, so a crash or a full disk leaves the previous
checkpoint intact. Arrays are stored without pickle.

Round seeds are derived from (seed, purpose, round, client) and optimisers start fresh every
round, so the state at a round boundary is all a resumed run needs to reproduce an uninterrupted
one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcollm.config import ExperimentConfig
from fedcollm.errors import FedcollmError
from fedcollm.experiment.state import flatten_state, unflatten_state

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1


def experiment_key(config: ExperimentConfig) -> str:
    """Identifies an experiment: the SHA-256 of its resolved configuration."""
    return hashlib.sha256(config.to_toml().encode("utf-8")).hexdigest()


class CheckpointError(FedcollmError, ValueError):
    """A checkpoint that cannot be used; the message names the folder and the reason."""


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch global generator states (JSON-able)."""
    np_state: Any = np.random.get_state(legacy=True)
    version, internal, gauss = random.getstate()
    return {
        "python": [list(internal), version, gauss],
        "numpy": [np_state[0], np.asarray(np_state[1]).tolist(), *map(_plain, np_state[2:])],
        "torch": torch.get_rng_state().tolist(),
        **(
            {"cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()]}
            if torch.cuda.is_available()
            else {}
        ),
    }


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def set_rng_state(state: dict[str, Any]) -> None:
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8, device="cpu"))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8, device="cpu") for s in cuda])


@dataclass
class Checkpoint:
    """What a run needs to continue after `round`."""

    round: int
    experiment_key: str
    state: dict[str, Any]
    """Arrays and scalars: adapters, algorithm state of server and clients."""
    record: dict[str, Any]
    """Metrics and communication so far (JSON-able)."""
    rng: dict[str, Any]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint, keep_last: int | None = None) -> Path:
    """Write a checkpoint atomically; then delete all but the newest `keep_last` (None: keep all)."""
    root = run_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"round-{checkpoint.round:04d}"
    layout, arrays = flatten_state(checkpoint.state)
    staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=root))
    try:
        with (staging / "arrays.npz").open("wb") as fh:
            np.savez(fh, allow_pickle=False, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        meta = {
            "format": FORMAT_VERSION,
            "round": checkpoint.round,
            "experiment_key": checkpoint.experiment_key,
            "layout": layout,
            "record": checkpoint.record,
            "rng": checkpoint.rng,
            "arrays_sha256": _sha256(staging / "arrays.npz"),
        }
        (staging / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if keep_last is not None:
        for old in sorted(root.glob("round-*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(folder: Path, experiment_key: str) -> Checkpoint:
    """Read and verify one checkpoint folder."""
    meta_path, arrays_path = folder / "meta.json", folder / "arrays.npz"
    if not meta_path.is_file() or not arrays_path.is_file():
        raise CheckpointError(f"{folder}: incomplete checkpoint (meta.json or arrays.npz missing)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{folder}: meta.json is corrupt ({exc})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: checkpoint format {meta.get('format')} is not {FORMAT_VERSION}")
    if meta.get("experiment_key") != experiment_key:
        raise CheckpointError(
            f"{folder}: this checkpoint belongs to another experiment (its configuration differs "
            "from the run folder's config.toml)"
        )
    if _sha256(arrays_path) != meta.get("arrays_sha256"):
        raise CheckpointError(f"{folder}: arrays.npz is corrupt (checksum mismatch)")
    with np.load(arrays_path, allow_pickle=False) as arrays:
        state = unflatten_state(meta["layout"], arrays)
    return Checkpoint(meta["round"], experiment_key, state, meta["record"], meta["rng"])


def latest_checkpoint(
    run_dir: Path, experiment_key: str, up_to: int | None = None
) -> tuple[Checkpoint | None, list[str]]:
    """The newest usable checkpoint (of a round <= `up_to`, if given), and a note for every newer
    one that had to be skipped."""
    notes: list[str] = []
    for folder in sorted((run_dir / CHECKPOINT_DIR).glob("round-*"), reverse=True):
        if up_to is not None and folder.name[len("round-") :].isdigit() and int(folder.name[6:]) > up_to:
            continue
        try:
            return load_checkpoint(folder, experiment_key), notes
        except CheckpointError as exc:
            if "another experiment" in str(exc):
                raise
            notes.append(f"skipped {exc}")
    return None, notes
