"""The Flower messages of a fedcollm run, and their conversion from and to the engine's objects.

Kept free of torch and transformers imports: in deployment every message starts a fresh
ClientApp process, and the SecAgg+ key-exchange stages must not pay for loading a model stack.

Message types (the ClientApp registers one handler per type):
- `query.hello`  server asks a SuperNode which client (partition) it is.
- `train.local`  one round's local update (`Payload` in, `ClientReply` out). With `hold` set the
  client keeps its adapter in its node state and replies only its example count, metrics and a
  magnitude bound: the adapter then leaves the node only through SecAgg+.
- `evaluate`     a client scores its own SLM (algorithms whose server never holds its adapter).
- `train`        the SecAgg+ stages (Flower's `secaggplus_mod`), uploading the held adapter masked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

HELLO = "query.hello"
TRAIN_LOCAL = "train.local"
EVALUATE = "evaluate"

PAYLOAD_ARRAYS = "payload"
PAYLOAD_CONFIG = "payload.config"
RUN = "fedcollm"
REPLY_ARRAYS = "reply"
REPLY_META = "reply.meta"
REPLY_METRICS = "reply.metrics"
HELD_ARRAYS = "fedcollm.held"
HELD_META = "fedcollm.held.meta"

NDArrays = dict[str, np.ndarray]


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named arrays -> ArrayRecord, names in the given order, values bit-exact."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def from_array_record(record: ArrayRecord) -> NDArrays:
    return {name: array.numpy() for name, array in record.items()}


@dataclass
class TrainRequest:
    """What `train.local` carries: the round's payload plus the experiment to rebuild it from."""

    rnd: int
    experiment: str
    """The resolved experiment TOML; clients rebuild their runtime from it."""
    arrays: NDArrays
    config: dict[str, Any] = field(default_factory=dict)
    hold: bool = False

    def to_record(self) -> RecordDict:
        return RecordDict(
            {
                PAYLOAD_ARRAYS: to_array_record(self.arrays),
                PAYLOAD_CONFIG: ConfigRecord(dict(self.config)),
                RUN: ConfigRecord({"round": self.rnd, "experiment": self.experiment, "hold": self.hold}),
            }
        )

    @classmethod
    def from_record(cls, content: RecordDict) -> TrainRequest:
        run = content.config_records[RUN]
        return cls(
            rnd=int(run["round"]),
            experiment=str(run["experiment"]),
            arrays=from_array_record(content.array_records[PAYLOAD_ARRAYS]),
            config=dict(content.config_records[PAYLOAD_CONFIG]),
            hold=bool(run["hold"]),
        )


@dataclass
class TrainResult:
    """What `train.local` answers. `arrays` is empty when the client holds them for SecAgg+."""

    client: int
    num_examples: int
    metrics: dict[str, float]
    arrays: NDArrays = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    bound: float = 0.0
    """A power of two strictly above the largest |value| of the held adapter (0 if not held)."""

    def to_record(self) -> RecordDict:
        content = RecordDict(
            {
                REPLY_META: ConfigRecord(
                    {
                        "client": self.client,
                        "num_examples": self.num_examples,
                        "names": list(self.names),
                        "bound": float(self.bound),
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
        return cls(
            client=int(meta["client"]),
            num_examples=int(meta["num_examples"]),
            metrics={k: float(v) for k, v in content.metric_records[REPLY_METRICS].items()},
            arrays=arrays,
            names=[str(n) for n in meta["names"]] if meta.get("names") else [],
            bound=float(meta["bound"]),
        )


def magnitude_bound(arrays: Mapping[str, np.ndarray]) -> float:
    """The smallest power of two strictly greater than every |value| (>= 2**-40).

    Clients report this instead of their exact maximum so the server learns only the binary
    order of magnitude of an adapter it is not allowed to see.
    """
    peak = max((float(np.max(np.abs(a))) for a in arrays.values() if a.size), default=0.0)
    if not math.isfinite(peak):
        raise ValueError("the adapter holds NaN or infinite values; refusing to upload it")
    return 2.0 ** max(-40, math.floor(math.log2(peak)) + 1) if peak > 0 else 2.0**-40
