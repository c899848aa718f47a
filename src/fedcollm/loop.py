"""The round loop of every experiment, written once; engines supply only the transport.

A transport delivers one payload to every client and returns their replies. The in-process
engine calls the clients' code directly; the Flower engines send messages. Everything else —
evaluation before training and after rounds, aggregation, the server step, the record — is here.
"""

from __future__ import annotations

from typing import Protocol

from fedcollm.algorithms import Algorithm
from fedcollm.recording import RunRecorder
from fedcollm.runtime import ClientReply, Payload, Reporter, ServerRuntime


class Transport(Protocol):
    """Moves one round's payload to the clients and their replies back."""

    def fit(self, payload: Payload, rnd: int) -> list[ClientReply]: ...

    def evaluate(self, payload: Payload, rnd: int) -> list[ClientReply]: ...


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
    for rnd in range(1, rounds + 1):
        reporter.message(f"round {rnd}/{rounds}")
        aggregate = {}
        if algorithm.uses_clients:
            payload = algorithm.configure_fit(server, rnd)
            # Client order fixes the float summation order, so every engine aggregates alike.
            replies = sorted(transport.fit(payload, rnd), key=lambda reply: reply.client)
            recorder.record_exchange(rnd, payload, replies)
            aggregate = algorithm.aggregate_fit(server, replies, rnd)
        recorder.record(algorithm.server_update(server, aggregate, rnd, reporter))
        if config.eval.every_round or rnd == rounds:
            recorder.record(_evaluate(algorithm, server, transport, rnd, reporter))
    recorder.finish(algorithm, server)
