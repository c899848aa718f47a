"""The round loop of every experiment, written once; engines supply only the transport.

A transport delivers one payload to every client and returns their replies. The in-process
engine calls the clients' code directly; the Flower engines send messages. Everything else —
evaluation before training and after rounds, aggregation, the server step, the record — is here.
"""

from __future__ import annotations

import numpy as np

from fedcollm.algorithms import Algorithm
from fedcollm.config import Weighting
from fedcollm.data.errors import without_values
from fedcollm.errors import RoundError
from fedcollm.experiment.checkpoint import (
    CHECKPOINT_DIR,
    Checkpoint,
    CheckpointError,
    experiment_key,
    latest_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fedcollm.experiment.recording import RunRecorder
from fedcollm.federation.privacy import GaussianMechanism, effective_multiplier, epsilon_of, mechanism
from fedcollm.parties.server import ServerRuntime
from fedcollm.protocol import (
    Arrays,
    ClientReply,
    Metric,
    Payload,
    Reporter,
    SecureAggregate,
    Seed,
    Transport,
    derive_seed,
)


def _dropouts(rnd: int, num_clients: int, replies: list[ClientReply]) -> list[Metric]:
    """One `dropped_out` line per client missing from a round (a transport may lose clients)."""
    present = {reply.client for reply in replies}
    return [Metric(rnd, "client", k, "dropped_out", 1.0) for k in range(num_clients) if k not in present]


def _kept(algorithm: Algorithm, recorder: RunRecorder, rnd: int) -> str:
    """Where a run stopped in round `rnd` can continue from."""
    if not algorithm.config.checkpoint.enabled:
        return "checkpoints are off (checkpoint.enabled = false)"
    folder = recorder.out / CHECKPOINT_DIR
    return f"the checkpoint of round {rnd - 1} is in {folder} (--resume continues from it)"


def _check_client_data(
    algorithm: Algorithm, transport: Transport, recorder: RunRecorder, reporter: Reporter, *, record: bool
) -> None:
    """Leave out the clients whose data does not fit, recorded as `data_error` with the reason
    (file, line, field), and stop before any training if fewer than `min_clients` remain."""
    errors = transport.client_data_errors()
    for client, reason in sorted(errors.items()):
        reporter.message(f"client {client} takes no part in this run: {reason}")
    if record:
        recorder.record(
            Metric(0, "client", k, "data_error", 1.0, note=without_values(why))
            for k, why in sorted(errors.items())
        )
    usable = algorithm.config.federation.num_clients - len(errors)
    minimum = algorithm.config.robustness.min_clients
    if errors and usable < minimum:
        reasons = "; ".join(f"client {k}: {why}" for k, why in sorted(errors.items()))
        raise RoundError(
            f"only {usable} client(s) have data the run can use, fewer than robustness.min_clients="
            f"{minimum}; nothing was trained. {reasons}"
        )


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
        kept = _kept(algorithm, recorder, rnd)
        raise RoundError(
            f"round {rnd}: {len(accepted)} of {len(replies)} uploads accepted, fewer than "
            f"robustness.min_clients={minimum} ({reasons}). The run stopped; {kept}"
        )
    return accepted


def _aggregate(
    algorithm: Algorithm, server: ServerRuntime, accepted: list[ClientReply], rnd: int, recorder: RunRecorder
) -> Arrays:
    """The round's aggregate: the algorithm's own, or under central DP the noised mean of the
    clipped updates (`fedcollm.federation.privacy`), with the privacy spent recorded."""
    privacy = algorithm.config.privacy
    if privacy.mode != "central":
        aggregate = algorithm.aggregate_fit(server, accepted, rnd)
        _record_privacy(algorithm, rnd, len(accepted), recorder)
        return aggregate
    dp = _mechanism(algorithm)
    rng = np.random.default_rng(derive_seed(algorithm.config.seed, Seed.DP_NOISE, rnd))
    result = dp.aggregate(accepted, server.global_adapter, rng)
    _record_privacy(algorithm, rnd, len(accepted), recorder, result.clipped)
    return result.arrays


def _mechanism(algorithm: Algorithm) -> GaussianMechanism:
    return mechanism(algorithm.config.privacy, algorithm.config.federation.rounds)


def _record_privacy(
    algorithm: Algorithm, rnd: int, received: int, recorder: RunRecorder, clipped: int | None = None
) -> None:
    """The round's noise multiplier and the ε spent up to it (nothing when DP is off).

    Central noise is scaled to the uploads received, so a round's multiplier is σ; distributed
    noise was added by each client for K uploads, so K' < K arrivals give σ·√(K'/K). The ε
    composes every round's multiplier recorded so far (metrics.jsonl survives a resume).
    """
    config = algorithm.config
    privacy = config.privacy
    if privacy.mode == "off":
        return
    sigma = _mechanism(algorithm).noise_multiplier
    if privacy.mode == "distributed":
        sigma = effective_multiplier(sigma, config.federation.num_clients, received)
    history = [m.value for m in recorder.metrics if m.metric == "dp_noise_multiplier" and m.round < rnd]
    epsilon = epsilon_of([*history, sigma], privacy.delta)
    note = (
        f"{privacy.mode} DP: clip {privacy.clip_norm:g}, noise multiplier {sigma:.4g}, "
        f"delta {privacy.delta:g}, {received} clients (Opacus RDP)"
    )
    metrics = [
        Metric(rnd, "server", None, "dp_noise_multiplier", sigma),
        Metric(rnd, "server", None, "dp_epsilon", epsilon, note=note),
    ]
    if clipped is not None:
        metrics.append(Metric(rnd, "server", None, "dp_clipped", float(clipped)))
    recorder.record(metrics)


def _secure_metrics(result: SecureAggregate, rnd: int, weighting: Weighting = "examples") -> list[Metric]:
    """The clients' training metrics as secure aggregation reveals them: one mean per metric,
    weighted as the adapters are (`federation.weighting`).

    Recorded as `role = "client"`, `client = None` (no single client's value is known).
    """
    clients = ", ".join(str(reply.client) for reply in result.replies)
    kind = "example-weighted" if weighting == "examples" else "unweighted"
    note = f"{kind} mean over clients {clients} (secure aggregation)"
    return [Metric(rnd, "client", None, key, value, note=note) for key, value in result.metrics.items()]


def _require_secure(algorithm: Algorithm, result: SecureAggregate, rnd: int, recorder: RunRecorder) -> None:
    """`robustness.min_clients` under secure aggregation: every upload in the mean counts as accepted."""
    minimum = algorithm.config.robustness.min_clients
    if len(result.replies) < minimum:
        raise RoundError(
            f"round {rnd}: the securely aggregated mean holds {len(result.replies)} client(s), fewer than "
            f"robustness.min_clients={minimum}. The run stopped; {_kept(algorithm, recorder, rnd)}"
        )


def _evaluate(
    algorithm: Algorithm,
    server: ServerRuntime,
    transport: Transport,
    rnd: int,
    reporter: Reporter,
    recorder: RunRecorder,
) -> None:
    """Evaluate as the algorithm does; record the metrics and every model's per-question records."""
    metrics = algorithm.evaluate(server, rnd, reporter)
    question_sets = server.take_evaluations()
    if algorithm.evaluates_on_clients:
        # Each client scores its own SLM (and, with task.client_eval, on its own file too).
        replies = sorted(transport.evaluate(Payload({}, {"round": rnd}), rnd), key=lambda r: r.client)
        metrics += algorithm.aggregate_evaluate(replies, rnd)
        question_sets += algorithm.client_question_sets(server, replies, rnd)
    elif algorithm.config.task.client_eval and algorithm.uses_clients:
        # The server's SLM, scored by every client on its own evaluation file: scores only.
        payload = Payload(algorithm.to_wire(server.global_adapter), {"round": rnd, "local_only": True})
        replies = sorted(transport.evaluate(payload, rnd), key=lambda r: r.client)
        metrics += algorithm.aggregate_evaluate(replies, rnd)
    recorder.record_questions(question_sets)
    recorder.record(metrics)


class _Checkpoints:
    """Saves the run's state at round boundaries into `<run>/checkpoints` and restores it."""

    def __init__(
        self, algorithm: Algorithm, server: ServerRuntime, transport: Transport, recorder: RunRecorder
    ) -> None:
        self.algorithm, self.server, self.transport, self.recorder = algorithm, server, transport, recorder
        self.key = experiment_key(algorithm.config)

    def save(self, rnd: int) -> None:
        config = self.algorithm.config.checkpoint
        if not config.enabled:
            return
        clients = self.transport.client_states()
        state = {"server": self.algorithm.server_state(self.server), "clients": clients}
        checkpoint = Checkpoint(rnd, self.key, state, self.recorder.snapshot(), rng_state())
        save_checkpoint(self.recorder.out, checkpoint, keep_last=config.keep_last or None)

    def restore(self, reporter: Reporter) -> int | None:
        """Load the newest usable checkpoint; the round it ended, or None to start from scratch."""
        checkpoint, notes = latest_checkpoint(self.recorder.out, self.key)
        for note in notes:
            reporter.message(note)
        if checkpoint is None:
            reporter.message(f"no checkpoint in {self.recorder.out}; starting from the beginning")
            return None
        clients = checkpoint.state["clients"]
        if self.algorithm.client_state_keys:
            if clients is None and not self.transport.clients_checkpoint_themselves:
                raise CheckpointError(
                    f"cannot resume {self.algorithm.name!r} here: its clients keep state between rounds "
                    "that this checkpoint does not hold (it was written by an engine whose clients keep "
                    "their state themselves, as Flower's SuperNodes do); resume it on that engine"
                )
            if clients is not None:
                self.transport.restore_client_states({int(k): v for k, v in clients.items()})
            # else each client restores its own checkpoint of the round before the next it is sent
        self.algorithm.restore_server_state(self.server, checkpoint.state["server"])
        self.recorder.restore(checkpoint.record)
        set_rng_state(checkpoint.rng)
        reporter.message(f"resuming {self.recorder.out} after round {checkpoint.round}")
        return checkpoint.round


def run_rounds(
    algorithm: Algorithm,
    server: ServerRuntime,
    transport: Transport,
    recorder: RunRecorder,
    reporter: Reporter,
    *,
    resume: bool = False,
) -> None:
    """Evaluate before training, then T rounds of fit -> aggregate -> server step -> evaluate.

    The state is checkpointed after the first evaluation and after every round; with `resume`
    the run continues from the newest checkpoint in the run folder. The server's optimiser steps
    go to the run's trackers (`report_to`) as party `server`.
    """
    reporter = recorder.reporter(reporter, "server")
    config = algorithm.config
    checkpoints = _Checkpoints(algorithm, server, transport, recorder)
    start = checkpoints.restore(reporter) if resume else None
    if algorithm.uses_clients:
        _check_client_data(algorithm, transport, recorder, reporter, record=start is None)
    if start is None:
        _evaluate(algorithm, server, transport, 0, reporter, recorder)
        checkpoints.save(0)
        start = 0
    rounds = algorithm.num_rounds()
    secure = algorithm.aggregates_securely(transport.secure)
    for rnd in range(start + 1, rounds + 1):
        reporter.message(f"round {rnd}/{rounds}")
        aggregate: Arrays = {}
        if algorithm.uses_clients:
            payload = algorithm.configure_fit(server, rnd, reporter)
            if secure:
                # The transport returns only the weighted mean, which replaces `aggregate_fit`
                # (algorithms declare `secure_aggregation` when theirs is that mean).
                result = transport.fit_aggregate(payload, rnd)
                replies, aggregate = result.replies, result.arrays
            else:
                # Client order fixes the float summation order, so every engine aggregates alike.
                replies = sorted(transport.fit(payload, rnd), key=lambda reply: reply.client)
            recorder.record_exchange(rnd, payload, replies)
            recorder.record(_dropouts(rnd, config.federation.num_clients, replies))
            if secure:
                recorder.record(_secure_metrics(result, rnd, config.federation.weighting))
                _require_secure(algorithm, result, rnd, recorder)
                _record_privacy(algorithm, rnd, len(result.replies), recorder)
            else:
                accepted = _screen(algorithm, server, payload, replies, rnd, recorder, reporter)
                aggregate = _aggregate(algorithm, server, accepted, rnd, recorder)
        recorder.record(algorithm.server_update(server, aggregate, rnd, reporter))
        if config.eval.every_round or rnd == rounds:
            _evaluate(algorithm, server, transport, rnd, reporter, recorder)
        checkpoints.save(rnd)
    recorder.finish(algorithm, server)
