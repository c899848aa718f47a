"""The ClientApp: a SuperNode's side of a fedcollm run.

The SuperNode's node config says which client it is (`partition-id`, `num-partitions`) and,
optionally, where its SLM computes (`device=cuda:1`; default: the experiment's `device`) and
where the site's own training file is (`data-path="/data/site.jsonl"`, for experiments with
`task.client_source = "files"`; it is read here and never sent anywhere). Every
`train.local` message carries the resolved experiment TOML, from which the client checks the
experiment (`Algorithm.check_config`), rebuilds its `ClientRuntime` (its own partition of the
data, encoded; the SLM from the local converted-model cache) and then calls the algorithm's own
`client_fit` — the same call the embedded engine makes, with the same seeds, so the update is
identical. The client's data never leaves this process: only the adapter and its training
metrics (or, under SecAgg+, their masked form) are sent back.

Between messages the client keeps exactly what the algorithm's `client_state` hook returns, as
a checkpoint on the node's disk per round (`client_state_dir`: atomic, checksummed, bound to the
experiment and to the run instance the server names), so it survives fresh ClientApp processes
(in deployment each message runs in one), a SuperNode restart and a resumed ServerApp, which
re-sends a round and finds each client's state of the round before. In simulation a Ray actor
serves many messages and also keeps what it built (one SLM per process, shared by the partitions
it serves, as in the embedded engine).

This module imports no torch: the SecAgg+ key-exchange stages run in fresh processes too, and
must not pay for loading a model stack. The model stack is imported by the handlers that train.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from fedcollm.engines.flower import records, secagg
from fedcollm.engines.flower.options import FlowerEngineError
from fedcollm.federation.aggregate import upload_weight

if TYPE_CHECKING:
    from fedcollm.algorithms.base import Algorithm
    from fedcollm.config import ExperimentConfig
    from fedcollm.lm.models import LoadedModel
    from fedcollm.parties.client import ClientRuntime
    from fedcollm.parties.data import ExperimentData
    from fedcollm.parties.resources import SharedResources
    from fedcollm.protocol import ClientReply

app = ClientApp()


def _partition(context: Context) -> tuple[int, int]:
    config = context.node_config
    if "partition-id" not in config or "num-partitions" not in config:
        raise FlowerEngineError(
            "this SuperNode does not know which client it is: start it with "
            "--node-config 'partition-id=<k> num-partitions=<K>'"
        )
    return int(config["partition-id"]), int(config["num-partitions"])


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Tell the server which client this SuperNode is."""
    client, num_clients = _partition(context)
    content = RecordDict({records.RUN: ConfigRecord({"client": client, "num_clients": num_clients})})
    return Message(content, reply_to=msg)


def _data_path(context: Context) -> str | None:
    """The site's own training file, from its `--node-config data-path=...` (None if not given)."""
    path = context.node_config.get("data-path")
    return None if path is None else str(path)


@app.query("data")
def check_data(msg: Message, context: Context) -> Message:
    """Read this client's data as the experiment asks; reply its size or what does not fit.

    The error names file, line and field but not the offending value (`without_values`): the
    whole message is printed here, in the SuperNode's log, for the site's operator.
    """
    import sys

    from fedcollm.data.errors import without_values
    from fedcollm.errors import FedcollmError

    client, _ = _partition(context)
    experiment = str(records.scalar(msg.content.config_records[records.RUN], "experiment"))
    try:
        config = _config(experiment, context)
        built = _experiment(experiment, config)
        size = len(built.data.client_questions(config, client, _data_path(context)))
        reply = ConfigRecord({"client": client, "num_examples": size})
    except FedcollmError as exc:
        print(f"fedcollm: client {client}'s data does not fit the experiment: {exc}", file=sys.stderr)
        reply = ConfigRecord({"client": client, "error": without_values(str(exc))})
    return Message(RecordDict({records.RUN: reply}), reply_to=msg)


# ------------------------------------------------------------------------------------------
# Client runtimes, rebuilt from the experiment TOML


@dataclass
class _Experiment:
    """What one ClientApp process builds once and reuses for every message of one experiment.

    In deployment each process serves one message, so this is used once; in simulation a Ray
    actor serves many clients' messages, which share its data, tokenizers and SLMs.
    """

    key: str
    data: ExperimentData
    resources: SharedResources
    models: dict[str, LoadedModel] = field(default_factory=dict)
    runtimes: dict[int, ClientRuntime] = field(default_factory=dict)


_BUILT: dict[str, _Experiment] = {}
"""The experiment this process serves, by its key (at most one entry): the module's only state."""


def _config(experiment: str, context: Context) -> ExperimentConfig:
    """The experiment the server sent, checked, with this node's device where it names one."""
    import tomllib

    from fedcollm.algorithms import check_config
    from fedcollm.config import build_config, with_device

    where = "the experiment sent by the server"
    config = build_config(tomllib.loads(experiment), where)
    check_config(config, where)
    node_device = context.node_config.get("device")
    if node_device is not None:
        # The node knows its hardware: its `--node-config device=cuda:1` places its SLM.
        config = with_device(config, str(node_device), "node config device")
    _, num_clients = _partition(context)
    if num_clients != config.federation.num_clients:
        raise FlowerEngineError(
            f"node config num-partitions={num_clients} but the experiment has "
            f"{config.federation.num_clients} clients"
        )
    return config


def _experiment(experiment: str, config: ExperimentConfig) -> _Experiment:
    """What this process built for `experiment` (its data; built once per process)."""
    from fedcollm.parties.data import ExperimentData
    from fedcollm.parties.resources import SharedResources

    key = experiment_key(experiment)
    if key not in _BUILT:
        _quiet()
        _BUILT.clear()
        _BUILT[key] = _Experiment(key, ExperimentData.load(config), SharedResources())
    return _BUILT[key]


def _runtime(experiment: str, client: int, context: Context) -> tuple[ExperimentConfig, ClientRuntime]:
    """This client's runtime for `experiment` (checked first, built once per process)."""
    from fedcollm.parties.client import ClientRuntime
    from fedcollm.parties.loading import load_client_model

    config = _config(experiment, context)
    built = _experiment(experiment, config)
    if client not in built.runtimes:
        # The same model, LoRA shape and seed as the embedded engine's `load_client_models`.
        name = config.federation.client_model(client, config.slm.name)
        if name not in built.models:
            built.models[name] = load_client_model(config, name)
        built.runtimes[client] = ClientRuntime.create(
            config, built.data, client, built.models[name], built.resources, _data_path(context)
        )
    return config, built.runtimes[client]


def experiment_key(experiment: str) -> str:
    """Identifies the experiment a message belongs to (the SHA-256 of its resolved TOML)."""
    return hashlib.sha256(experiment.encode()).hexdigest()


STATE_DIR = "fedcollm-client-state"
"""Where a node checkpoints its clients' state, under its `FLWR_HOME` (or node config `state-dir`)."""


def client_state_dir(context: Context, instance: str, client: int) -> Path:
    """This node's checkpoint folder for client `client` of run `instance`: its node config's
    `state-dir`, else `$FLWR_HOME/fedcollm-client-state` (the SuperNode's own home), else
    `~/.flwr/fedcollm-client-state`. It stays on the node: nothing in it is ever sent."""
    if not re.fullmatch(r"[0-9a-f]{32}", instance):
        raise FlowerEngineError(f"the server named run instance {instance!r}; expected 32 hex digits")
    base = context.node_config.get("state-dir")
    if base is not None:
        root = Path(str(base)).expanduser()
    else:
        root = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")) / STATE_DIR
    return root / instance / f"client-{client}"


def _keep_last(config: ExperimentConfig) -> int | None:
    """Client checkpoints to keep: one more than the server keeps (a resume from the server's
    oldest kept round needs the client's state before it); two with checkpoints off."""
    if not config.checkpoint.enabled:
        return 2
    return None if not config.checkpoint.keep_last else config.checkpoint.keep_last + 1


def save_client_state(algorithm: Algorithm, client: ClientRuntime, folder: Path, key: str, rnd: int) -> None:
    """Checkpoint exactly `algorithm.client_state(client)` after round `rnd` into `folder`,
    atomically and checksummed, bound to experiment `key` (`fedcollm.experiment.checkpoint`).

    Raises `StateError` naming the entry if the state holds a value that cannot be stored.
    """
    from fedcollm.experiment.checkpoint import Checkpoint, save_checkpoint
    from fedcollm.experiment.state import flatten_state

    state = algorithm.client_state(client)
    flatten_state(state, f"client {client.client_id}'s state")  # names an unstorable entry
    checkpoint = Checkpoint(rnd, key, {"client": state}, record={}, rng={})
    save_checkpoint(folder, checkpoint, keep_last=_keep_last(algorithm.config))


def restore_client_state(
    algorithm: Algorithm, client: ClientRuntime, folder: Path, key: str, up_to: int
) -> int | None:
    """Give `client` the state of its newest checkpoint of a round <= `up_to` for experiment
    `key` (none: the state it starts a run with); the round restored, or None."""
    from fedcollm.experiment.checkpoint import latest_checkpoint

    for name in algorithm.client_state_keys:
        client.state.pop(name, None)
    checkpoint, _ = latest_checkpoint(folder, key, up_to=up_to)
    if checkpoint is None:
        return None
    algorithm.restore_client_state(client, checkpoint.state["client"])
    return checkpoint.round


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _run_client_hook(
    hook: Literal["client_fit", "client_evaluate"], msg: Message, context: Context
) -> tuple[Algorithm, records.TrainRequest, ClientReply]:
    """Decode a request, run the algorithm's client hook on this node's runtime, keep its state."""
    from fedcollm.algorithms import ALGORITHMS
    from fedcollm.protocol import Payload, Reporter

    client_id, _ = _partition(context)
    request = records.TrainRequest.from_record(msg.content)
    config, client = _runtime(request.experiment, client_id, context)
    algorithm = ALGORITHMS[config.algorithm](config)
    key = experiment_key(request.experiment)
    folder = client_state_dir(context, request.instance, client_id)
    # A round's update starts from the state after the round before (also when this round is
    # run again after a resume); an evaluation scores the state after its own round's update.
    up_to = request.rnd - 1 if hook == "client_fit" else request.rnd
    restore_client_state(algorithm, client, folder, key, up_to)
    payload = Payload(arrays=request.arrays, config=request.config)
    run: dict[str, Any] = {"client_fit": algorithm.client_fit, "client_evaluate": algorithm.client_evaluate}
    reply = run[hook](client, payload, request.rnd, Reporter())
    if algorithm.client_state_keys:
        save_client_state(algorithm, client, folder, key, request.rnd)
    return algorithm, request, reply


@app.train("local")
def train_local(msg: Message, context: Context) -> Message:
    """One round's local update, by the algorithm's own `client_fit`."""
    algorithm, request, reply = _run_client_hook("client_fit", msg, context)
    result = records.TrainResult(
        client=reply.client, num_examples=reply.num_examples, metrics=dict(reply.metrics)
    )
    if request.hold:
        # The adapter and the metrics stay on this node; they leave only masked, through SecAgg+,
        # weighted as the server's plain mean would weigh them.
        weight = upload_weight(reply.num_examples, algorithm.config.federation.weighting)
        held = secagg.hold(context, request.rnd, algorithm.from_wire(reply.arrays), weight, reply.metrics)
        result.metrics = {}
        result.names, result.bound = held.names, held.bound
        result.metric_names, result.metrics_bound = held.metric_names, held.metrics_bound
    else:
        result.arrays = reply.arrays
    return Message(result.to_record(), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The client scores its own SLM (algorithms whose server never holds client adapters)."""
    _, _, reply = _run_client_hook("client_evaluate", msg, context)
    result = records.TrainResult(
        client=reply.client,
        num_examples=reply.num_examples,
        metrics=dict(reply.metrics),
        arrays=dict(reply.arrays),
    )
    return Message(result.to_record(), reply_to=msg)


@app.train(mods=[secaggplus_mod])
def upload_held(msg: Message, context: Context) -> Message:
    """SecAgg+'s stages; `secaggplus_mod` calls this only for the vector to mask."""
    return secagg.masked_upload(msg, context)
