"""The ClientApp: a SuperNode's side of a fedcollm run.

The SuperNode's node config says which client it is (`partition-id`, `num-partitions`) and,
optionally, where its SLM computes (`device=cuda:1`; default: the experiment's `device`) and
where the site's own training file is (`data-path="/data/site.jsonl"`, for experiments with
`task.client_source = "files"`; it is read on the node and never sent anywhere). Every
`train.local` message carries the resolved experiment TOML, from which the client checks the
experiment (`Algorithm.check_config`), rebuilds its `ClientRuntime` (its own partition of the
data, encoded; the SLM from the local converted-model cache) and then calls the algorithm's own
`client_fit` — the same call the embedded engine makes, with the same seeds, so the update is
identical. The client's data never leaves the node: only the adapter and its training metrics
(or, under SecAgg+, their masked form) are sent back.

That work is `client_work.handle`. Where the request asks for it (deployment: run config
`node-worker`, on by default) and the node allows it, the work is done by the node's worker
process (`node_worker`), which keeps the model and data loaded across the run's messages;
otherwise in this process (simulation, where a Ray actor serves many messages and keeps what it
built). Between rounds the client's state is checkpointed on the node's disk either way.

This module imports no torch: in deployment each message runs in a fresh ClientApp process
(forked from the SuperNode's warm `clientapp_executor`, which imports this module and must hold
no model stack to fork), and neither the SecAgg+ key-exchange stages nor a hand-over to the
worker may pay for loading one.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from fedcollm.engines.flower import client_work, node_worker, records, secagg

app = ClientApp()


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Tell the server which client this SuperNode is."""
    client, num_clients = client_work.partition(context.node_config)
    content = RecordDict({records.RUN: ConfigRecord({"client": client, "num_clients": num_clients})})
    return Message(content, reply_to=msg)


def _work(kind: client_work.WorkKind, msg: Message, context: Context) -> RecordDict:
    """The reply content of a request: from the node's worker where asked and allowed, else here."""
    instance, use_worker = records.routing(msg.content)
    started, age = time.perf_counter(), _process_age()
    if use_worker and node_worker.available(context.node_config):
        client, _ = client_work.partition(context.node_config)
        reply = node_worker.NodeWorker(context.node_config, instance, client).call(kind, msg.content)
    else:
        reply = client_work.handle(kind, msg.content, context.node_config)
    # For the node's operator: what a message costs beyond its work (the process, Flower's polls).
    since = "" if age is None else f" {age:.1f} s after this ClientApp process started,"
    print(
        f"fedcollm: {kind} handled{since} in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return reply


def _process_age() -> float | None:
    """Seconds since this process started (Linux's /proc; None elsewhere)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


@app.query("data")
def check_data(msg: Message, context: Context) -> Message:
    """Read this client's data as the experiment asks; reply its size or what does not fit."""
    return Message(_work("data", msg, context), reply_to=msg)


@app.query("release")
def release(msg: Message, context: Context) -> Message:
    """The run is over: stop this node's worker for it, if one runs."""
    instance, _ = records.routing(msg.content)
    client, _ = client_work.partition(context.node_config)
    released = (
        node_worker.available(context.node_config)
        and node_worker.NodeWorker(context.node_config, instance, client).release()
    )
    return Message(RecordDict({records.RUN: ConfigRecord({"released": released})}), reply_to=msg)


@app.train("local")
def train_local(msg: Message, context: Context) -> Message:
    """One round's local update, by the algorithm's own `client_fit`."""
    content = _work("fit", msg, context)
    if records.HELD_UPLOAD not in content.array_records:
        return Message(content, reply_to=msg)
    # The adapter and the metrics stay on this node; they leave only masked, through SecAgg+,
    # weighted as the server's plain mean would weigh them.
    result, adapter, weight = client_work.held_upload(content)
    request = records.TrainRequest.from_record(msg.content)
    held = secagg.hold(context, request.rnd, adapter, weight, result.metrics)
    result.metrics = {}
    result.names, result.bound = held.names, held.bound
    result.metric_names, result.metrics_bound = held.metric_names, held.metrics_bound
    return Message(result.to_record(), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The client scores its own SLM (algorithms whose server never holds client adapters)."""
    return Message(_work("evaluate", msg, context), reply_to=msg)


@app.train(mods=[secaggplus_mod])
def upload_held(msg: Message, context: Context) -> Message:
    """SecAgg+'s stages; `secaggplus_mod` calls this only for the vector to mask."""
    return secagg.masked_upload(msg, context)
