"""The server side of the Flower engine: a `Transport` that moves rounds over a Flower `Grid`.

The round loop (`fedcollm.experiment.loop.run_rounds`) runs inside the ServerApp and calls this
transport exactly as it calls the embedded one. `fit` returns every client's reply;
`fit_aggregate` runs the round under SecAgg+ (`fedcollm.engines.flower.secagg`) and returns only
the weighted mean, which the loop hands to the algorithm's server step (for FedCoLLM: the
distillation runs on the securely aggregated adapter), and the clients' training metrics as
SecAgg+ aggregated them too: each one's mean with the adapters' weights (`federation.weighting`:
by example count, or uniform), no client's own value.

SuperNodes are told which client they are by their node config (`partition-id`,
`num-partitions`); the transport asks each new node once (`query.hello`) and checks that the K
nodes cover partitions 0..K-1 exactly once. A node that fails or disappears during a round is
left out of that round (and recorded by the loop as dropped out) as long as `min_clients`
remain; nodes that come back are used again from the next round.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedcollm.engines.flower import records
from fedcollm.engines.flower.options import FlowerEngineError, FlowerOptions
from fedcollm.engines.flower.secagg import (
    ClientStats,
    SecAggSettings,
    derive_settings,
    finish_mean,
    metric_error_bound,
    run_secagg,
    split_metrics,
)
from fedcollm.federation.aggregate import upload_weight
from fedcollm.protocol import ClientReply, ClientStates, Payload, Reporter, SecureAggregate

if TYPE_CHECKING:
    from fedcollm.config import ExperimentConfig
    from fedcollm.experiment.recording import RunRecorder


class PollingGrid:
    """A Grid whose `send_and_receive` polls often and stops waiting for nodes that went away.

    Flower 1.42's network Grid sleeps 3 s between polls, which adds seconds to every message
    exchange (SecAgg+ makes four per round). And a reply from a SuperNode that died is only
    replaced by an error once the SuperLink has missed its heartbeats; here a message whose
    destination has left the federation's online nodes is given up as soon as that is seen, so
    callers treat the node as dropped out. Everything else is delegated unchanged.
    """

    def __init__(self, grid: Grid, interval: float = 0.25, liveness_every: float = 2.0) -> None:
        self._grid = grid
        self._interval = interval
        self._liveness_every = liveness_every

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        ids = list(self._grid.push_messages(messages))
        destination = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=True) if mid}
        pending = set(destination)
        deadline = None if timeout is None else time.monotonic() + timeout
        next_liveness = time.monotonic() + self._liveness_every
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            received = list(self._grid.pull_messages(pending))
            replies += received
            pending -= {m.metadata.reply_to_message_id for m in received}
            if pending and time.monotonic() >= next_liveness:
                online = set(self._grid.get_node_ids())
                pending = {mid for mid in pending if destination[mid] in online}
                next_liveness = time.monotonic() + self._liveness_every
            if pending:
                time.sleep(self._interval)
        return replies


class FlowerTransport:
    """Sends `train.local` messages to the SuperNodes; optionally aggregates with SecAgg+."""

    def __init__(
        self,
        grid: Grid,
        config: ExperimentConfig,
        options: FlowerOptions,
        reporter: Reporter | None = None,
        recorder: RunRecorder | None = None,
    ) -> None:
        """`recorder`: the run's, whose `instance` (kept across resumes) binds the clients'
        checkpoints to this run; without one, a fresh instance per transport."""

        self.grid = PollingGrid(grid)
        self.config = config
        self.options = options
        self.reporter = reporter or Reporter()
        self.experiment = config.to_toml()
        self.num_clients = config.federation.num_clients
        self.clients: dict[int, int] = {}
        """node id -> client id, for nodes that said hello."""
        self.failures: dict[int, dict[int, str]] = {}
        """round -> client id -> why it is missing from that round."""
        self.recorder = recorder
        self._instance = uuid.uuid4().hex
        self.data_errors: dict[int, str] | None = None
        """client id -> why its data cannot be used (asked once, before the first round)."""
        self.secagg_settings: dict[int, SecAggSettings] = {}
        self.secagg_error: dict[int, float] = {}

    @property
    def secure(self) -> bool:
        return self.options.secagg

    @property
    def instance(self) -> str:
        """The run instance named in every request (the clients' checkpoints are bound to it)."""
        return self.recorder.instance if self.recorder is not None else self._instance

    clients_checkpoint_themselves = True
    """Each SuperNode checkpoints its client's state with every round, on its own disk."""

    def client_states(self) -> ClientStates | None:
        """None: each client's state lives on its SuperNode, not in the server's process."""
        return None

    def restore_client_states(self, states: ClientStates) -> None:
        from fedcollm.experiment.checkpoint import CheckpointError

        raise CheckpointError(
            "cannot resume here: the checkpoint holds the clients' state between rounds, but on "
            "Flower that state lives on the SuperNodes, which this server cannot give it to; resume "
            "the run on the engine that wrote the checkpoint"
        )

    # ---------------------------------------------------------------------------------------
    # Nodes

    def connect(self) -> None:
        """Wait until K SuperNodes covering partitions 0..K-1 are connected."""
        deadline = time.monotonic() + self.options.connect_timeout
        self.reporter.phase(f"waiting for {self.num_clients} SuperNodes")
        while True:
            self._discover()
            present = sorted(set(self.clients.values()))
            self.reporter.advance(len(present), self.num_clients)
            if len(present) == self.num_clients:
                return
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.num_clients)) - set(present))
                raise FlowerEngineError(
                    f"only {len(present)} of {self.num_clients} SuperNodes connected within "
                    f"{self.options.connect_timeout:.0f} s (missing partition-id {missing}); "
                    "start one SuperNode per client with --node-config "
                    f"'partition-id=<k> num-partitions={self.num_clients}'"
                )
            time.sleep(0.5)

    def _discover(self, strict: bool = True) -> None:
        """Forget nodes that went offline; ask new ones which client they are.

        At the start (`strict`) a misconfigured SuperNode stops the run with the reason; during
        the run it is only reported and left out (e.g. a restarted SuperNode whose old self the
        SuperLink still lists as online).
        """
        online = set(self.grid.get_node_ids())
        for node in set(self.clients) - online:
            del self.clients[node]
        new = sorted(online - set(self.clients))
        if not new:
            return
        hello = [Message(RecordDict({}), dst_node_id=node, message_type=records.HELLO) for node in new]
        replies = self.grid.send_and_receive(hello, timeout=60.0)
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in hello}
        for reply in replies:
            node = sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                # A node that died (the SuperLink lists it until its heartbeats lapse) is not a
                # misconfigured one: wait for it to leave, or for its restarted self to say hello.
                continue
            try:
                self._register(node, reply, online)
            except FlowerEngineError as exc:
                if strict:
                    raise
                self.reporter.message(f"leaving SuperNode {node} out: {exc}")

    def _register(self, node: int, reply: Message, online: set[int]) -> None:
        if reply.has_error():
            raise FlowerEngineError(f"SuperNode {node} failed to say which client it is: {_reason(reply)}")
        info = reply.content.config_records[records.RUN]
        client, declared = int(records.number(info, "client")), int(records.number(info, "num_clients"))
        if declared != self.num_clients or not 0 <= client < self.num_clients:
            raise FlowerEngineError(
                f"SuperNode {node} has node config partition-id={client} "
                f"num-partitions={declared}, but the experiment has "
                f"{self.num_clients} clients (partition-id 0..{self.num_clients - 1})"
            )
        twin = [n for n, c in self.clients.items() if c == client and n in online]
        if twin:
            raise FlowerEngineError(
                f"SuperNodes {twin[0]} and {node} both have partition-id={client}; give "
                "every SuperNode its own partition-id"
            )
        self.clients[node] = client

    def client_data_errors(self) -> dict[int, str]:
        """Ask every connected client, once, whether its own data fits (`query.data`); the
        clients whose data does not, with the reason their node gave, are left out of the run."""
        if self.data_errors is not None:
            return dict(self.data_errors)
        asked = ConfigRecord({"experiment": self.experiment, "instance": self.instance})
        asked["worker"] = self.options.node_worker
        request = RecordDict({records.RUN: asked})
        nodes = dict(sorted(self.clients.items(), key=lambda item: item[1]))
        messages = [Message(request, dst_node_id=node, message_type=records.DATA_CHECK) for node in nodes]
        self.reporter.phase(f"checking the data of {len(messages)} clients")
        errors = {client: "no SuperNode connected" for client in range(self.num_clients)}
        for client in nodes.values():
            errors[client] = "no reply to the data check (SuperNode lost, or round-timeout reached)"
        replies = self.grid.send_and_receive(messages, timeout=self.options.round_timeout or None)
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        for reply in replies:
            answering = nodes.get(sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id))
            if answering is None:
                continue
            if reply.has_error():
                errors[answering] = f"its data check failed: {_reason(reply)}"
                continue
            answer = reply.content.config_records[records.RUN]
            if "error" in answer:
                errors[answering] = str(records.scalar(answer, "error"))
            else:
                del errors[answering]
        self.data_errors = errors
        return dict(errors)

    def _targets(self, rnd: int) -> dict[int, int]:
        self._discover(strict=False)
        left_out = self.data_errors or {}
        targets = {
            node: client
            for node, client in sorted(self.clients.items(), key=lambda item: item[1])
            if client not in left_out
        }
        absent = set(range(self.num_clients)) - set(targets.values()) - set(left_out)
        for client in sorted(absent):
            self._fail(rnd, client, "SuperNode not connected at the start of the round")
        for client, reason in sorted(left_out.items()):
            self._fail(rnd, client, f"left out of the run: {reason}")
        return targets

    def _fail(self, rnd: int, client: int, reason: str) -> None:
        self.failures.setdefault(rnd, {})[client] = reason
        self.reporter.message(f"round {rnd}: client {client} dropped out ({reason})")

    def _require(self, rnd: int, count: int, needed: int, what: str) -> None:
        if count >= needed:
            return
        reasons = "; ".join(f"client {c}: {why}" for c, why in sorted(self.failures.get(rnd, {}).items()))
        raise FlowerEngineError(
            f"round {rnd}: only {count} client(s) {what}, fewer than the {needed} needed "
            f"(min-clients={self.options.min_clients}). {reasons}"
        )

    def release(self, timeout: float = 60.0) -> None:
        """The run is over: ask every connected SuperNode to stop its worker for it (`query.release`).

        Best effort: a node that does not answer stops its worker when the worker's idle timeout
        passes or its SuperNode goes away."""
        if not self.options.node_worker or not self.clients:
            return
        content = RecordDict({records.RUN: ConfigRecord({"instance": self.instance, "worker": True})})
        messages = [Message(content, dst_node_id=node, message_type=records.RELEASE) for node in self.clients]
        try:
            self.grid.send_and_receive(messages, timeout=timeout)
        except Exception as exc:  # the run's result is written already; never fail it here
            self.reporter.message(f"could not release the SuperNodes' workers: {exc}")

    # ---------------------------------------------------------------------------------------
    # Local training

    def _exchange(
        self, payload: Payload, rnd: int, *, hold: bool = False, message_type: str = records.TRAIN_LOCAL
    ) -> list[tuple[int, records.TrainResult]]:
        """Send the payload to every connected client; return (node, result) in client order."""
        targets = self._targets(rnd)
        request = records.TrainRequest(
            rnd=rnd,
            experiment=self.experiment,
            arrays=payload.arrays,
            config=dict(payload.config),
            hold=hold,
            instance=self.instance,
            worker=self.options.node_worker,
        )
        messages = [
            Message(
                request.to_record(),
                dst_node_id=node,
                message_type=message_type,
                group_id=str(rnd),
            )
            for node in targets
        ]
        self.reporter.phase(f"round {rnd} · {len(messages)} SuperNodes: {message_type}")
        timeout = self.options.round_timeout or None
        results: list[tuple[int, records.TrainResult]] = []
        answered: set[int] = set()
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            client = targets.get(node)
            # Error replies generated by the SuperLink (e.g. node unavailable) name the
            # SuperLink as source; match them to the message they answer instead.
            if client is None:
                client = _client_of_error(reply, messages, targets)
            if client is None:
                continue
            answered.add(client)
            if reply.has_error():
                self._fail(rnd, client, _reason(reply))
                continue
            result = records.TrainResult.from_record(reply.content)
            if result.client != client:
                raise FlowerEngineError(
                    f"SuperNode {node} answered as client {result.client}, said hello as {client}"
                )
            results.append((node, result))
        for client in sorted(set(targets.values()) - answered):
            self._fail(rnd, client, "no reply (SuperNode lost, or round-timeout reached)")
        results.sort(key=lambda item: item[1].client)
        return results

    def fit(self, payload: Payload, rnd: int) -> list[ClientReply]:

        results = self._exchange(payload, rnd)
        self._require(rnd, len(results), self.options.min_clients, "sent an update")
        return [
            ClientReply(client=r.client, arrays=r.arrays, num_examples=r.num_examples, metrics=r.metrics)
            for _, r in results
        ]

    def evaluate(self, payload: Payload, rnd: int) -> list[ClientReply]:
        """Clients evaluate their own SLMs (for algorithms whose server holds no client adapter)."""

        results = self._exchange(payload, rnd, message_type=records.EVALUATE)
        return [
            ClientReply(client=r.client, arrays=r.arrays, num_examples=r.num_examples, metrics=r.metrics)
            for _, r in results
        ]

    # ---------------------------------------------------------------------------------------
    # Secure aggregation

    def fit_aggregate(self, payload: Payload, rnd: int) -> SecureAggregate:

        results = self._exchange(payload, rnd, hold=True)
        self._require(rnd, len(results), self.options.min_clients, "trained")
        names = list(payload.arrays)
        metric_names = results[0][1].metric_names if results else []
        for _, r in results:
            if r.names != names:
                raise FlowerEngineError(
                    f"client {r.client} holds adapter names that differ from the global "
                    f"adapter's ({r.names[:2]}... vs {names[:2]}...); SecAgg+ needs the same layout"
                )
            if r.metric_names != metric_names:
                raise FlowerEngineError(
                    f"client {r.client} holds metrics {r.metric_names} but client {results[0][1].client} "
                    f"holds {metric_names}; SecAgg+ needs the same layout"
                )
            if r.metrics:
                raise FlowerEngineError(
                    f"client {r.client} sent its training metrics in plain during a SecAgg+ round; "
                    "they must travel masked (is it running an older fedcollm?)"
                )
        weighting = self.config.federation.weighting
        stats = [
            ClientStats(node, r.client, upload_weight(r.num_examples, weighting), r.bound, r.metrics_bound)
            for node, r in results
        ]
        settings = derive_settings(stats, self.options)
        self.secagg_settings[rnd] = settings
        self.reporter.phase(f"round {rnd} · SecAgg+ over {len(stats)} clients")
        # PollingGrid stands in for the Grid it wraps (every other method is the Grid's own).
        mean, included = run_secagg(cast(Grid, self.grid), stats, settings, rnd, self.options)
        by_node = dict(results)
        for node, result in results:
            if node not in included:
                self._fail(rnd, result.client, "lost during SecAgg+")
        self._require(rnd, len(included), self.options.min_clients, "completed SecAgg+")
        shapes = {name: payload.arrays[name].shape for name in names}
        mean, metrics = split_metrics(settings, mean, metric_names)
        aggregate, settings, self.secagg_error[rnd] = finish_mean(
            settings, stats, included, mean, shapes, self.options.secagg_tolerance
        )
        self.reporter.message(
            f"round {rnd}: SecAgg+ mean of {len(included)} clients (clipping {settings.clipping_range:.4g}, "
            f"{settings.quantization_range} levels, max weight {settings.max_weight:g}); quantisation "
            f"error <= {self.secagg_error[rnd]:.2e} relative"
            + (f", metric means within {metric_error_bound(settings):.1e}" if metrics else "")
        )
        replies = [
            ClientReply(
                client=by_node[node].client,
                # The server never sees a client's adapter; shape-only stand-ins let the run's
                # communication ledger count what each client uploaded (masked).
                arrays={n: np.broadcast_to(np.float32(0), shapes[n]) for n in names},
                num_examples=by_node[node].num_examples,
            )
            for node in sorted(included, key=lambda n: by_node[n].client)
        ]
        return SecureAggregate(
            arrays=aggregate,
            num_examples=sum(r.num_examples for r in replies),
            replies=replies,
            metrics=metrics,
        )


def _reason(reply: Message) -> str:
    """A client's error in one line: Flower's reasons can carry whole (Ray) tracebacks."""
    error = reply.error
    text = (error.reason or "error").strip()
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    short = (lines[-1] if lines else text).removesuffix("'>")
    return f"{short[:400]} (Flower error code {error.code})"


def _client_of_error(reply: Message, messages: Iterable[Message], targets: dict[int, int]) -> int | None:
    for message in messages:
        if message.metadata.message_id == reply.metadata.reply_to_message_id:
            return targets.get(message.metadata.dst_node_id)
    return None
