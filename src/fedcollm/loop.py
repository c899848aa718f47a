"""The round loop of every experiment, written once; engines supply only the transport.

A transport delivers one payload to every client and returns their replies. The in-process
engine calls the clients' code directly; the Flower engines send messages. Everything else —
evaluation before training and after rounds, aggregation, the server step, the record — is here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fedcollm.algorithms import Algorithm
from fedcollm.models import Arrays
from fedcollm.recording import RunRecorder
from fedcollm.runtime import ClientReply, Metric, Payload, Reporter, ServerRuntime


class Transport(Protocol):
    """Moves one round's payload to the clients and their replies back."""

    def fit(self, payload: Payload, rnd: int) -> list[ClientReply]: ...

    def evaluate(self, payload: Payload, rnd: int) -> list[ClientReply]: ...


@dataclass
class SecureAggregate:
    """A round aggregated under secure aggregation: the server sees only the weighted mean.

    `replies` name the clients in the mean with their example counts and metrics; their arrays
    are shape-only stand-ins (for the communication record), never a client's values.
    """

    arrays: Arrays
    num_examples: int
    replies: list[ClientReply]


class SecureTransport(Transport, Protocol):
    """A transport that can compute the example-weighted mean without revealing the uploads."""

    secure: bool

    def fit_aggregate(self, payload: Payload, rnd: int) -> SecureAggregate: ...


def _dropouts(rnd: int, num_clients: int, replies: list[ClientReply]) -> list[Metric]:
    """One `dropped_out` line per client missing from a round (a transport may lose clients)."""
    present = {reply.client for reply in replies}
    return [Metric(rnd, "client", k, "dropped_out", 1.0) for k in range(num_clients) if k not in present]


class RoundError(RuntimeError):
    """A round that cannot be aggregated (too few acceptable uploads)."""


def _screen(
    algorithm: Algorithm,
    server: ServerRuntime,
    payload: Payload,
    replies: list[ClientReply],
    rnd: int,
    recorder: RunRecorder,
    reporter: Reporter,
) -> list[ClientReply]:
    """Drop uploads the algorithm refuses, record who and why, and stop if too few remain."""
    accepted, rejected = algorithm.screen_fit(server, payload, replies, rnd)
    for rejection in rejected:
        reporter.message(f"round {rnd}: rejected the upload of client {rejection.client}: {rejection.reason}")
    recorder.record(Metric(rnd, "client", r.client, "rejected", 1.0, note=r.reason) for r in rejected)
    minimum = algorithm.config.robustness.min_clients
    if len(accepted) < minimum:
        reasons = "; ".join(f"client {r.client}: {r.reason}" for r in rejected)
        raise RoundError(
            f"round {rnd}: {len(accepted)} of {len(replies)} uploads accepted, fewer than "
            f"robustness.min_clients={minimum} ({reasons})"
        )
    return accepted


def _evaluate(
    algorithm: Algorithm, server: ServerRuntime, transport: Transport, rnd: int, reporter: Reporter
):
    metrics = algorithm.evaluate(server, rnd, reporter)
    if algorithm.evaluates_on_clients:
        replies = sorted(transport.evaluate(Payload({}, {"round": rnd}), rnd), key=lambda r: r.client)
        metrics += algorithm.aggregate_evaluate(replies, rnd)
    return metrics


def run_rounds(
    algorithm: Algorithm,
    server: ServerRuntime,
    transport: Transport,
    recorder: RunRecorder,
    reporter: Reporter,
) -> None:
    """Evaluate before training, then T rounds of fit -> aggregate -> server step -> evaluate."""
    config = algorithm.config
    recorder.record(_evaluate(algorithm, server, transport, 0, reporter))
    rounds = algorithm.num_rounds()
    secure = algorithm.secure_aggregation and getattr(transport, "secure", False)
    for rnd in range(1, rounds + 1):
        reporter.message(f"round {rnd}/{rounds}")
        aggregate = {}
        if algorithm.uses_clients:
            payload = algorithm.configure_fit(server, rnd)
            if secure:
                # The transport returns only the weighted mean, which replaces `aggregate_fit`
                # (algorithms declare `secure_aggregation` when theirs is that mean).
                result = transport.fit_aggregate(payload, rnd)  # type: ignore[attr-defined]
                replies, aggregate = result.replies, result.arrays
            else:
                # Client order fixes the float summation order, so every engine aggregates alike.
                replies = sorted(transport.fit(payload, rnd), key=lambda reply: reply.client)
            recorder.record_exchange(rnd, payload, replies)
            recorder.record(_dropouts(rnd, config.federation.num_clients, replies))
            if not secure:
                accepted = _screen(algorithm, server, payload, replies, rnd, recorder, reporter)
                aggregate = algorithm.aggregate_fit(server, accepted, rnd)
        recorder.record(algorithm.server_update(server, aggregate, rnd, reporter))
        if config.eval.every_round or rnd == rounds:
            recorder.record(_evaluate(algorithm, server, transport, rnd, reporter))
    recorder.finish(algorithm, server)
