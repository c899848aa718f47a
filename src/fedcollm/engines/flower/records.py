"""The Flower messages of a fedcollm run, and their conversion from and to the engine's objects.

Kept free of torch and transformers imports: in deployment every message starts a fresh
ClientApp process, and the SecAgg+ key-exchange stages must not pay for loading a model stack.

Message types (the ClientApp registers one handler per type):
- `query.hello`  server asks a SuperNode which client (partition) it is.
- `query.data`   before the first round, server asks each client whether its own data fits the
  experiment; the reply is its example count, or the error (file, line, field; no record value).
- `train.local`  one round's local update (`Payload` in, `ClientReply` out). With `hold` set the
  client keeps its adapter and its training metrics in its node state and replies only its
  example count, the names of both and power-of-two magnitude bounds: adapter and metrics then
  leave the node only through SecAgg+ (`secagg`), and the server learns only their means.
- `evaluate`     a client scores its own SLM (algorithms whose server never holds its adapter).
- `train`        the SecAgg+ stages (Flower's `secaggplus_mod`), uploading the held adapter masked.
- `query.release` at the end of a run, server tells each SuperNode to stop the worker process
  that kept the client's model and data loaded for the run (`node_worker`).

Every request's `fedcollm` record also says whether the node should keep a worker for the run
(`worker`) and names the run instance (`instance`, kept across resumes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedcollm.engines.flower.options import FlowerEngineError
from fedcollm.protocol import Arrays, Scalar

HELLO = "query.hello"
DATA_CHECK = "query.data"
TRAIN_LOCAL = "train.local"
EVALUATE = "evaluate"
RELEASE = "query.release"

PAYLOAD_ARRAYS = "payload"
PAYLOAD_CONFIG = "payload.config"
RUN = "fedcollm"
REPLY_ARRAYS = "reply"
REPLY_META = "reply.meta"
REPLY_METRICS = "reply.metrics"
HELD_UPLOAD = "held"
"""Between a node's worker and its ClientApp only: the adapter to hold for SecAgg+."""
HELD_WEIGHT = "held.weight"


def scalar(record: ConfigRecord, key: str) -> int | float | str | bool:
    """One scalar entry of a config record (a list where a scalar belongs is a malformed message)."""
    value = record[key]
    if not isinstance(value, int | float | str | bool):
        raise FlowerEngineError(f"message entry {key!r} is a {type(value).__name__}, expected a scalar")
    return value


def number(record: ConfigRecord, key: str) -> float:
    """A numeric entry of a config record."""
    value = scalar(record, key)
    if isinstance(value, str):
        raise FlowerEngineError(f"message entry {key!r} is text, expected a number")
    return float(value)


PACKED_LAYOUT = "fedcollm.layout"
"""The entry of a packed ArrayRecord that says where each named array lies (JSON, as bytes)."""
PACKED_PREFIX = "fedcollm.packed."
"""Entries of a packed ArrayRecord: one flat array per dtype (`fedcollm.packed.<f4`)."""


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named arrays -> an ArrayRecord of one flat array per dtype and their layout; bit-exact.

    Flower moves every Array of a message as separate objects, one HTTP request each on every
    hop (SuperLink, SuperNode, ClientApp): a LoRA adapter of 120 tensors took some 250 requests
    per message and hop, seconds of every deployment round (bench/README.md, "Engines").
    Packed, a message carries a handful of objects whatever the adapter's size in tensors.
    """
    layout: list[list[object]] = []
    flat: dict[str, list[np.ndarray]] = {}
    filled: dict[str, int] = {}
    for name, value in arrays.items():
        array = np.asarray(value)
        kind = array.dtype.str
        layout.append([name, kind, list(array.shape), filled.get(kind, 0)])
        flat.setdefault(kind, []).append(np.ascontiguousarray(array).reshape(-1))
        filled[kind] = filled.get(kind, 0) + array.size
    record = {PACKED_PREFIX + kind: Array(np.concatenate(parts)) for kind, parts in flat.items()}
    record[PACKED_LAYOUT] = Array(np.frombuffer(json.dumps(layout).encode("utf-8"), dtype=np.uint8))
    return ArrayRecord(record)


def from_array_record(record: ArrayRecord) -> Arrays:
    """The named arrays of `to_array_record`, in their order (a record of plain named arrays too)."""
    if PACKED_LAYOUT not in record:
        return {name: array.numpy() for name, array in record.items()}
    layout = json.loads(record[PACKED_LAYOUT].numpy().tobytes().decode("utf-8"))
    flat = {key[len(PACKED_PREFIX) :]: array.numpy() for key, array in record.items() if key != PACKED_LAYOUT}
    arrays: Arrays = {}
    for name, kind, shape, start in layout:
        size = int(np.prod(shape, dtype=np.int64))
        arrays[name] = flat[kind][start : start + size].reshape(shape).copy()
    return arrays


@dataclass
class TrainRequest:
    """What `train.local` carries: the round's payload plus the experiment to rebuild it from."""

    rnd: int
    experiment: str
    """The resolved experiment TOML; clients rebuild their runtime from it."""
    arrays: Arrays
    config: dict[str, Scalar] = field(default_factory=dict)
    hold: bool = False
    instance: str = ""
    """The run instance (kept across resumes) whose client checkpoints the client uses."""
    worker: bool = False
    """Whether the node keeps a worker process for the run (`node_worker`; deployment)."""

    def to_record(self) -> RecordDict:
        return RecordDict(
            {
                PAYLOAD_ARRAYS: to_array_record(self.arrays),
                PAYLOAD_CONFIG: ConfigRecord(dict(self.config)),
                RUN: ConfigRecord(
                    {
                        "round": self.rnd,
                        "experiment": self.experiment,
                        "hold": self.hold,
                        "instance": self.instance,
                        "worker": self.worker,
                    }
                ),
            }
        )

    @classmethod
    def from_record(cls, content: RecordDict) -> TrainRequest:
        run = content.config_records[RUN]
        settings = content.config_records[PAYLOAD_CONFIG]
        return cls(
            rnd=int(number(run, "round")),
            experiment=str(scalar(run, "experiment")),
            arrays=from_array_record(content.array_records[PAYLOAD_ARRAYS]),
            config={key: scalar(settings, key) for key in settings},
            hold=bool(scalar(run, "hold")),
            instance=str(scalar(run, "instance")),
            worker=bool(scalar(run, "worker")) if "worker" in run else False,
        )


def routing(content: RecordDict) -> tuple[str, bool]:
    """(run instance, whether to use the node's worker) of any request that names them."""
    run = content.config_records[RUN]
    instance = str(scalar(run, "instance")) if "instance" in run else ""
    return instance, bool(scalar(run, "worker")) if "worker" in run else False


@dataclass
class TrainResult:
    """What `train.local` answers. `arrays` and `metrics` are empty when the client holds them for SecAgg+."""

    client: int
    num_examples: int
    metrics: dict[str, float]
    arrays: Arrays = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    bound: float = 0.0
    """A power of two strictly above the largest |value| of the held adapter (0 if not held)."""
    metric_names: list[str] = field(default_factory=list)
    """The held metrics' names, in the order they are masked (their values stay on the node)."""
    metrics_bound: float = 0.0
    """A power of two strictly above the largest |value| of the held metrics (0: none held)."""

    def to_record(self) -> RecordDict:
        content = RecordDict(
            {
                REPLY_META: ConfigRecord(
                    {
                        "client": self.client,
                        "num_examples": self.num_examples,
                        "names": list(self.names),
                        "bound": float(self.bound),
                        "metric_names": list(self.metric_names),
                        "metrics_bound": float(self.metrics_bound),
                    }
                ),
                REPLY_METRICS: MetricRecord({k: float(v) for k, v in self.metrics.items()}),
            }
        )
        if self.arrays:
            content[REPLY_ARRAYS] = to_array_record(self.arrays)
        return content

    @classmethod
    def from_record(cls, content: RecordDict) -> TrainResult:
        meta = content.config_records[REPLY_META]
        arrays = (
            from_array_record(content.array_records[REPLY_ARRAYS])
            if REPLY_ARRAYS in content.array_records
            else {}
        )
        names, metric_names = meta.get("names"), meta.get("metric_names")
        return cls(
            client=int(number(meta, "client")),
            num_examples=int(number(meta, "num_examples")),
            metrics={k: float(v) for k, v in content.metric_records[REPLY_METRICS].items()},  # type: ignore[arg-type]
            arrays=arrays,
            names=[str(n) for n in names] if isinstance(names, list) else [],
            bound=number(meta, "bound"),
            metric_names=[str(n) for n in metric_names] if isinstance(metric_names, list) else [],
            metrics_bound=number(meta, "metrics_bound") if "metrics_bound" in meta else 0.0,
        )
