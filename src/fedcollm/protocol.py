"""The types every party shares, and the contract of a transport: torch-free by design.

A run moves `Payload` messages from the server to clients and `ClientReply` messages back;
`Metric` lines go into the run record; a `Reporter` shows progress; `derive_seed` gives every
random stream of a run its own seed, the same on every engine. A `Transport` is what an engine
provides to the round loop. Nothing here imports torch, transformers or peft, so the Flower
engine's message handling (and anything else that only moves messages) stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

Arrays = dict[str, np.ndarray]
"""Named arrays as they travel (adapters, knowledge sets, feedback): name -> array, in a fixed order."""

Scalar = int | float | str | bool
"""A setting that travels beside the arrays of a message."""

StepCallback = Callable[[int, int, float], None]
"""Called after each optimiser step with (step, total_steps, loss)."""


@dataclass
class Payload:
    """Server -> client message: named arrays and scalar settings."""

    arrays: Arrays
    config: dict[str, Scalar] = field(default_factory=dict)


@dataclass
class ClientReply:
    """Client -> server message: named arrays, the example count that weighs them, metrics."""

    client: int
    arrays: Arrays
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    """One line of `metrics.jsonl`."""

    round: int
    role: str
    client: int | None
    metric: str
    value: float
    note: str | None = None
    """Free text where a number is not enough (e.g. why an upload was rejected)."""

    def as_dict(self) -> dict[str, Any]:
        line: dict[str, Any] = {
            "round": self.round,
            "role": self.role,
            "client": self.client,
            "metric": self.metric,
            "value": self.value,
        }
        if self.note is not None:
            line["note"] = self.note
        return line


class Reporter:
    """Progress sink; the CLI's rich display implements it, tests use this silent default."""

    def phase(self, description: str, total: int | None = None) -> None:
        """A new unit of work begins (e.g. 'round 2 · client 3 training')."""

    def advance(self, completed: int, total: int | None = None, info: str = "") -> None:
        """Progress inside the current unit of work."""

    def message(self, text: str) -> None:
        """A line worth keeping in the log."""

    def step_callback(self) -> StepCallback:
        """An optimiser-step callback that shows the step count and the loss."""
        return lambda step, total, loss: self.advance(step, total, f"loss {loss:.3f}")


def derive_seed(seed: int, *parts: int) -> int:
    """A 31-bit seed for one (round, client, purpose), identical on every engine."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclass
class SecureAggregate:
    """A round aggregated under secure aggregation: the server sees only the weighted mean.

    `replies` name the clients in the mean with their example counts and metrics; their arrays
    are shape-only stand-ins (for the communication record), never a client's values.
    """

    arrays: Arrays
    num_examples: int
    replies: list[ClientReply]


ClientStates = dict[int, dict[str, Any]]
"""Each client's state between rounds (what `Algorithm.client_state` returns), by client id."""


class Transport(Protocol):
    """What an engine gives the round loop: it moves one round's messages, and nothing else.

    The embedded engine calls the clients' hooks in this process; the Flower engines send
    messages to SuperNodes. The loop never asks which one it has.
    """

    @property
    def secure(self) -> bool:
        """Whether `fit_aggregate` computes the weighted mean without revealing any upload."""
        ...

    def fit(self, payload: Payload, rnd: int) -> list[ClientReply]:
        """Deliver `payload` to every client for its local update; return their replies."""
        ...

    def fit_aggregate(self, payload: Payload, rnd: int) -> SecureAggregate:
        """As `fit`, but return only the example-weighted mean of the uploads (if `secure`)."""
        ...

    def evaluate(self, payload: Payload, rnd: int) -> list[ClientReply]:
        """Ask every client to evaluate its own model; return their replies."""
        ...

    def client_states(self) -> ClientStates | None:
        """Every client's state for a checkpoint; None where the clients keep it themselves."""
        ...

    def restore_client_states(self, states: ClientStates) -> None:
        """Give every client back its state from a checkpoint (raises where that is impossible)."""
        ...
