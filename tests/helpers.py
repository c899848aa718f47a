"""Helpers every test module shares: tiny experiment configs (one per registered algorithm) and
readers of a run folder.

`ALGORITHM_CONFIGS` holds the smallest config that runs each registered algorithm end to end on
the tiny models of `conftest.py`; `tests/test_contract.py` runs every one of them through the
resume, determinism, dry-run and bad-input contract, and fails for an algorithm registered
without an entry here.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message, RecordDict

from fedcollm.engines.flower.client_app import app as client_app
from fedcollm.experiment.checkpoint import CHECKPOINT_DIR


def tiny_config(slm: Path, llm: Path, **overrides: object) -> dict[str, Any]:
    """A FedCoLLM experiment on tiny models: 24 ARC-Easy questions, 2 clients, 2 rounds."""
    data: dict[str, Any] = {
        "name": "tiny",
        "algorithm": "fedcollm",
        "seed": 0,
        "slm": {"name": str(slm), "lr": 1e-3, "lora": {"r": 4}},
        "llm": {"name": str(llm), "lr": 1e-3, "lora": {"r": 8}},
        "task": {"name": "arc_easy", "train_limit": 24, "aux_fraction": 0.25},
        "federation": {"rounds": 2, "num_clients": 2},
        "train": {"batch_size": 4, "max_length": 128},
        "distill": {"batch_size": 4},
        "eval": {"limit": 8, "batch_size": 16},
    }
    data.update(overrides)
    return data


@dataclass(frozen=True)
class TinyModels:
    """The tiny model folders of `conftest.py`: an SLM, an LLM with the SLM's tokenizer, and a
    model with a tokenizer of its own."""

    slm: Path
    llm: Path
    other: Path


def _fedmkt(models: TinyModels) -> dict[str, Any]:
    """Two clients on two tokenizer families, so both directions of alignment run."""
    federation = {"rounds": 2, "num_clients": 2, "client_models": [str(models.slm), str(models.other)]}
    return tiny_config(models.slm, models.llm, algorithm="fedmkt", federation=federation)


def _crosslm(models: TinyModels) -> dict[str, Any]:
    crosslm = {
        "num_candidates": 4,
        "max_new_tokens": 12,
        "generation_batch_size": 4,
        "heldout_task": "arc_challenge",
        "heldout_limit": 4,
    }
    return tiny_config(models.slm, models.llm, algorithm="crosslm", crosslm=crosslm)


def _plain(name: str) -> Callable[[TinyModels], dict[str, Any]]:
    return lambda models: tiny_config(models.slm, models.llm, algorithm=name)


ALGORITHM_CONFIGS: dict[str, Callable[[TinyModels], dict[str, Any]]] = {
    "fedcollm": _plain("fedcollm"),
    "fedavg": _plain("fedavg"),
    "standalone": _plain("standalone"),
    "centralized": _plain("centralized"),
    "zeroshot": _plain("zeroshot"),
    "fedmkt": _fedmkt,
    "crosslm": _crosslm,
}
"""The tiny config of every registered algorithm (a test keeps the keys equal to the registry)."""


class Interrupted(Exception):
    """Stands in for a crash in the middle of a round."""


def crash_clients_in_round(monkeypatch: Any, crash_round: int) -> None:
    """Make the embedded engine fail after the first client of `crash_round` has trained."""
    import fedcollm.engines.local as local_engine
    from fedcollm.protocol import ClientReply, Payload

    class CrashingTransport(local_engine.InProcessTransport):
        def fit(self, payload: Payload, rnd: int) -> list[ClientReply]:
            if rnd == crash_round:
                self.algorithm.client_fit(self.clients[0], payload, rnd, self.reporter)
                raise Interrupted(f"crash in round {rnd}")
            return super().fit(payload, rnd)

    monkeypatch.setattr(local_engine, "InProcessTransport", CrashingTransport)


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """The lines of a run folder's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_files(out: Path) -> dict[str, bytes]:
    """Everything a finished run leaves, except checkpoints: metrics, results, adapters."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and CHECKPOINT_DIR not in p.parts and ".flwr" not in p.parts
    }


def saved_adapter(out: Path, role: str = "slm") -> dict[str, np.ndarray]:
    """The final adapter a run saved for `role`, as arrays."""
    from safetensors.numpy import load_file

    return load_file(out / "adapters" / role / "adapter_model.safetensors")


def relative_l2(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """||a - b|| / ||b|| over all arrays (float64)."""
    diff = sum(float(np.sum((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2)) for k in b)
    return math.sqrt(diff / sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in b))


def processes_with_env(entry: str) -> list[int]:
    """Live processes whose environment holds `entry` (e.g. this run's FLWR_HOME)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if entry.encode() in (proc / "environ").read_bytes().split(b"\0"):
                stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                if stat[0] != "Z":
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


def assert_no_processes_left(flwr_home: Path, timeout: float = 30.0) -> None:
    """Every process a Flower run started with this FLWR_HOME has exited (waits up to `timeout`)."""
    entry = f"FLWR_HOME={flwr_home.resolve()}"
    deadline = time.monotonic() + timeout
    while (left := processes_with_env(entry)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of this run still alive: {left}"


def event_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of one TensorBoard event folder, as TensorBoard shows them (its purges
    applied), read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()[SCALARS]}


# ---------------------------------------------------------------------------------------------
# SuperNodes in this process


class NodesGrid:
    """SuperNodes with the given node configs, answering through the real ClientApp."""

    def __init__(self, node_configs: list[dict]) -> None:
        self.contexts = {
            200 + i: Context(run_id=1, node_id=200 + i, node_config=cfg, state=RecordDict(), run_config={})
            for i, cfg in enumerate(node_configs)
        }
        self.replies: dict[str, object] = {}
        self.run = SimpleNamespace(run_id=1)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:  # type: ignore[no-untyped-def]
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            ids.append(message.metadata.message_id)
            context = self.contexts[message.metadata.dst_node_id]
            try:
                reply = client_app(message=message, context=context)
            except Exception as exc:  # as Flower's runtime does: an error reply
                reply = Message(Error(code=2, reason=str(exc)), reply_to=message)
            self.replies[ids[-1]] = reply
        return ids

    def pull_messages(self, ids) -> list:  # type: ignore[no-untyped-def]
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def nodes(*ids: int, total: int = 3) -> list[dict]:
    return [{"partition-id": i, "num-partitions": total} for i in ids]
