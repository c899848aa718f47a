"""The types every party shares, and the contract of a transport: torch-free by design.

A run moves `Payload` messages from the server to clients and `ClientReply` messages back;
`Metric` lines go into the run record; a `Reporter` shows progress; `derive_seed` gives every
random stream of a run its own seed (one per `Seed` purpose, round and client), the same on
every engine. A `Transport` is what an engine
provides to the round loop. Nothing here imports torch, transformers or peft, so the Flower
engine's message handling (and anything else that only moves messages) stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
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


class Seed(IntEnum):
    """What a random stream is for; each purpose has its own stream (see `derive_seed`)."""

    SLM_INIT = 1
    """The SLM's LoRA initialisation (the same for every client and the server)."""
    LLM_INIT = 2
    """The LLM's LoRA initialisation."""
    CLIENT_TRAIN = 3
    """A client's local training in a round: shuffling and dropout."""
    LLM_TRAIN = 4
    """The server's supervised training of the LLM in a round (Centralized, CrossLM)."""
    DISTILL = 5
    """The server's mutual distillation in a round (FedCoLLM)."""
    KNOWLEDGE_LLM = 6
    """The server's knowledge training of the LLM in a round (FedMKT)."""
    KNOWLEDGE_CLIENT = 7
    """A client's knowledge training in a round (FedMKT's ClientUpdate2)."""
    DEMONSTRATIONS = 8
    """Which auxiliary questions each generation prompt shows (CrossLM)."""
    GENERATION = 9
    """The LLM's sampling of synthetic examples (CrossLM)."""
    CHOICE_ORDER = 10
    """The permutation of each synthetic example's choices (CrossLM)."""
    DP_NOISE = 11
    """The Gaussian noise central differential privacy adds to a round's adapter mean."""


def derive_seed(seed: int, purpose: Seed, rnd: int = 0, client: int | None = None) -> int:
    """A 63-bit seed for one (purpose, round, client) of the experiment seeded with `seed`.

    The same on every engine and process. Purpose, round and client are separate coordinates of
    NumPy's `SeedSequence` spawn key, so no two streams share an input however many rounds or
    clients a run has (`client=None`: a stream of the server); and 63 bits make two outputs
    equal by accident about as likely as n^2 / 2^64 for n streams.
    """
    slot = 0 if client is None else client + 1
    sequence = np.random.SeedSequence(seed, spawn_key=(int(purpose), rnd, slot))
    return int(sequence.generate_state(1, dtype=np.uint64)[0] & np.uint64(0x7FFF_FFFF_FFFF_FFFF))


@dataclass
class SecureAggregate:
    """A round aggregated under secure aggregation: the server sees only the weighted mean.

    `replies` name the clients in the mean with their example counts; their arrays are
    shape-only stand-ins (for the communication record), never a client's values, and their
    metrics are empty: the clients' training metrics are aggregated securely too, and `metrics`
    holds what that reveals, each metric's mean over the clients in the mean, weighted as the
    arrays are (`federation.weighting`: by example count, or uniform).
    """

    arrays: Arrays
    num_examples: int
    replies: list[ClientReply]
    metrics: dict[str, float] = field(default_factory=dict)


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

    @property
    def clients_checkpoint_themselves(self) -> bool:
        """Whether every client checkpoints its own state with each round (Flower's SuperNodes),
        so the server's checkpoint holds none and a resume restores none."""
        ...

    def fit(self, payload: Payload, rnd: int) -> list[ClientReply]:
        """Deliver `payload` to every client for its local update; return their replies."""
        ...

    def fit_aggregate(self, payload: Payload, rnd: int) -> SecureAggregate:
        """As `fit`, but return only the weighted mean of the uploads (if `secure`), weighted as
        `federation.weighting` says."""
        ...

    def evaluate(self, payload: Payload, rnd: int) -> list[ClientReply]:
        """Ask every client to evaluate its own model; return their replies."""
        ...

    def client_data_errors(self) -> dict[int, str]:
        """Clients whose own data could not be used, and why (file, line, field), found before
        the first round; they take no part in the run. Empty when every client's data fits."""
        ...

    def client_states(self) -> ClientStates | None:
        """Every client's state for a checkpoint; None where the clients keep it themselves."""
        ...

    def restore_client_states(self, states: ClientStates) -> None:
        """Give every client back its state from a checkpoint (raises where that is impossible)."""
        ...
