"""What a SuperNode computes for the server: the client's runtime and the algorithm's client hooks.

Every request that needs the client's data or model (`query.data`, `train.local`, `evaluate`)
is answered by `handle`, a function of the request's content and the node's config only. The
ClientApp runs it either in its own process (Flower's simulation, where a Ray actor serves many
messages) or hands it to the node's worker process (`fedcollm.engines.flower.node_worker`,
deployment), which keeps what `handle` builds — the data, encoded; the SLM; tokenizers — for
every later message of the run. Both give the same reply bit for bit: the worker calls this very
function.

From the node config a client takes which client it is (`partition-id`, `num-partitions`), and
optionally where its SLM computes (`device=cuda:1`), its own training and evaluation files
(`data-path`, `eval-path`), how many CPU threads it may use (`threads`) and where it checkpoints
its state (`state-dir`).

Between messages a client keeps exactly what the algorithm's `client_state` hook returns, as a
checkpoint on the node's disk per round (`client_state_dir`: atomic, checksummed, bound to the
experiment and to the run instance the server names), so it survives a fresh process, a SuperNode
restart and a resumed ServerApp, which re-sends a round and finds each client's state of the round
before.

This module imports no torch at module level: the ClientApp imports it to read node configs.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedcollm.engines.flower import records
from fedcollm.engines.flower.options import FlowerEngineError
from fedcollm.federation.aggregate import upload_weight

if TYPE_CHECKING:
    from fedcollm.algorithms.base import Algorithm
    from fedcollm.config import ExperimentConfig
    from fedcollm.lm.models import LoadedModel
    from fedcollm.parties.client import ClientRuntime
    from fedcollm.parties.data import ExperimentData
    from fedcollm.parties.resources import SharedResources
    from fedcollm.protocol import ClientReply, Scalar

NodeConfig = Mapping[str, Any]
"""A SuperNode's `--node-config` entries (Flower's `Context.node_config`)."""

WorkKind = Literal["data", "fit", "evaluate"]
WORK_KINDS: tuple[WorkKind, ...] = ("data", "fit", "evaluate")


def partition(node_config: NodeConfig) -> tuple[int, int]:
    """(client id, number of clients) from the node config, or an error saying how to set them."""
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise FlowerEngineError(
            "this SuperNode does not know which client it is: start it with "
            "--node-config 'partition-id=<k> num-partitions=<K>'"
        )
    return int(node_config["partition-id"]), int(node_config["num-partitions"])


def data_path(node_config: NodeConfig) -> str | None:
    """The site's own training file, from its `--node-config data-path=...` (None if not given)."""
    path = node_config.get("data-path")
    return None if path is None else str(path)


def eval_path(node_config: NodeConfig) -> str | None:
    """The site's own evaluation file, from its `--node-config eval-path=...` (None if not given)."""
    path = node_config.get("eval-path")
    return None if path is None else str(path)


def experiment_key(experiment: str) -> str:
    """Identifies the experiment a message belongs to (the SHA-256 of its resolved TOML)."""
    return hashlib.sha256(experiment.encode()).hexdigest()


# ------------------------------------------------------------------------------------------
# Client runtimes, rebuilt from the experiment TOML


@dataclass
class _Experiment:
    """What one process builds once and reuses for every message of one experiment.

    A node's worker serves one client's messages for a whole run; in simulation a Ray actor
    serves many clients' messages, which share its data, tokenizers and SLMs.
    """

    key: str
    data: ExperimentData
    resources: SharedResources
    models: dict[str, LoadedModel] = field(default_factory=dict)
    runtimes: dict[int, ClientRuntime] = field(default_factory=dict)


_BUILT: dict[str, _Experiment] = {}
"""The experiment this process serves, by its key (at most one entry): the module's only state."""


def _config(experiment: str, node_config: NodeConfig) -> ExperimentConfig:
    """The experiment the server sent, checked, with this node's device where it names one."""
    import tomllib

    from fedcollm.algorithms import check_config
    from fedcollm.config import build_config, with_device

    where = "the experiment sent by the server"
    config = build_config(tomllib.loads(experiment), where)
    check_config(config, where)
    node_device = node_config.get("device")
    if node_device is not None:
        # The node knows its hardware: its `--node-config device=cuda:1` places its SLM.
        config = with_device(config, str(node_device), "node config device")
    _, num_clients = partition(node_config)
    if num_clients != config.federation.num_clients:
        raise FlowerEngineError(
            f"node config num-partitions={num_clients} but the experiment has "
            f"{config.federation.num_clients} clients"
        )
    return config


def _experiment(experiment: str, config: ExperimentConfig, node_config: NodeConfig) -> _Experiment:
    """What this process built for `experiment` (its data; built once per process)."""
    from fedcollm.parties.data import ExperimentData
    from fedcollm.parties.resources import SharedResources

    key = experiment_key(experiment)
    if key not in _BUILT:
        _prepare_process(node_config)
        _note(f"loading the data of experiment {key[:12]} (process {os.getpid()})")
        _BUILT.clear()
        _BUILT[key] = _Experiment(key, ExperimentData.load(config), SharedResources())
    return _BUILT[key]


def _runtime(experiment: str, client: int, node_config: NodeConfig) -> tuple[ExperimentConfig, ClientRuntime]:
    """This client's runtime for `experiment` (checked first, built once per process)."""
    from fedcollm.parties.client import ClientRuntime
    from fedcollm.parties.loading import load_client_model

    config = _config(experiment, node_config)
    built = _experiment(experiment, config, node_config)
    if client not in built.runtimes:
        # The same model, LoRA shape and seed as the embedded engine's `load_client_models`.
        name = config.federation.client_model(client, config.slm.name)
        if name not in built.models:
            _note(f"loading {name} for client {client} (process {os.getpid()})")
            built.models[name] = load_client_model(config, name)
        built.runtimes[client] = ClientRuntime.create(
            config,
            built.data,
            client,
            built.models[name],
            built.resources,
            data_path(node_config),
            eval_path(node_config),
        )
    return config, built.runtimes[client]


def _note(text: str) -> None:
    """A line for the node's operator (the SuperNode's or the worker's log)."""
    import sys

    print(f"fedcollm: {text}", file=sys.stderr, flush=True)


def _prepare_process(node_config: NodeConfig) -> None:
    """Quiet transformers' progress output; use the node's `threads` CPU threads if it names them
    (several SuperNodes sharing one machine split its cores)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    threads = node_config.get("threads")
    if threads is not None:
        import torch

        if int(threads) < 1:
            raise FlowerEngineError(f"node config threads={threads}: must be at least 1")
        torch.set_num_threads(int(threads))


# ------------------------------------------------------------------------------------------
# Client state, checkpointed on the node

STATE_DIR = "fedcollm-client-state"
"""Where a node checkpoints its clients' state, under its `FLWR_HOME` (or node config `state-dir`)."""


def state_root(node_config: NodeConfig) -> Path:
    """This node's folder for client checkpoints (and its worker's log): its node config's
    `state-dir`, else `$FLWR_HOME/fedcollm-client-state` (the SuperNode's own home), else
    `~/.flwr/fedcollm-client-state`. It stays on the node: nothing in it is ever sent."""
    base = node_config.get("state-dir")
    if base is not None:
        return Path(str(base)).expanduser()
    return Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")) / STATE_DIR


def client_state_dir(node_config: NodeConfig, instance: str, client: int) -> Path:
    """This node's checkpoint folder for client `client` of run `instance` (under `state_root`)."""
    if not re.fullmatch(r"[0-9a-f]{32}", instance):
        raise FlowerEngineError(f"the server named run instance {instance!r}; expected 32 hex digits")
    return state_root(node_config) / instance / f"client-{client}"


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


# ------------------------------------------------------------------------------------------
# The work


def run_hook(
    hook: Literal["client_fit", "client_evaluate"], request: records.TrainRequest, node_config: NodeConfig
) -> tuple[Algorithm, ClientReply]:
    """Run the algorithm's client hook on this node's runtime for `request`, keeping its state."""
    from fedcollm.algorithms import ALGORITHMS
    from fedcollm.protocol import Payload, Reporter

    client_id, _ = partition(node_config)
    config, client = _runtime(request.experiment, client_id, node_config)
    algorithm = ALGORITHMS[config.algorithm](config)
    key = experiment_key(request.experiment)
    folder = client_state_dir(node_config, request.instance, client_id)
    # A round's update starts from the state after the round before (also when this round is
    # run again after a resume); an evaluation scores the state after its own round's update.
    up_to = request.rnd - 1 if hook == "client_fit" else request.rnd
    restore_client_state(algorithm, client, folder, key, up_to)
    payload = Payload(arrays=request.arrays, config=request.config)
    run: dict[str, Any] = {"client_fit": algorithm.client_fit, "client_evaluate": algorithm.client_evaluate}
    reply = run[hook](client, payload, request.rnd, Reporter())
    if algorithm.client_state_keys:
        save_client_state(algorithm, client, folder, key, request.rnd)
    return algorithm, reply


def check_data(experiment: str, node_config: NodeConfig) -> dict[str, Scalar]:
    """Read this client's data as the experiment asks: its size, or what does not fit.

    The error names file, line and field but not the offending value (`without_values`): the
    whole message is printed here, in the node's log, for the site's operator.
    """
    import sys

    from fedcollm.data.errors import without_values
    from fedcollm.errors import FedcollmError

    client, _ = partition(node_config)
    try:
        config = _config(experiment, node_config)
        built = _experiment(experiment, config, node_config)
        questions = built.data.client_records(config, client, data_path(node_config))
        built.data.client_eval_records(config, client, eval_path(node_config))  # its own file fits too
        return {"client": client, "num_examples": len(questions)}
    except FedcollmError as exc:
        print(f"fedcollm: client {client}'s data does not fit the experiment: {exc}", file=sys.stderr)
        return {"client": client, "error": without_values(str(exc))}


def handle(kind: WorkKind, content: RecordDict, node_config: NodeConfig) -> RecordDict:
    """The reply content for one request of `kind` (what the ClientApp or the worker sends back).

    `fit` with `hold` (SecAgg+) replies the adapter decoded from the transport dtype under
    `records.HELD_UPLOAD` and its SecAgg+ weight in the metadata: the ClientApp keeps both in its
    node state for the masking stages, and neither leaves the node in plain.
    """
    if kind == "data":
        experiment = str(records.scalar(content.config_records[records.RUN], "experiment"))
        return RecordDict({records.RUN: ConfigRecord(dict(check_data(experiment, node_config)))})
    request = records.TrainRequest.from_record(content)
    hook: Literal["client_fit", "client_evaluate"] = "client_fit" if kind == "fit" else "client_evaluate"
    algorithm, reply = run_hook(hook, request, node_config)
    result = records.TrainResult(
        client=reply.client, num_examples=reply.num_examples, metrics=dict(reply.metrics)
    )
    if kind == "fit" and request.hold:
        weight = upload_weight(reply.num_examples, algorithm.config.federation.weighting)
        reply_content = result.to_record()
        reply_content[records.HELD_UPLOAD] = records.to_array_record(algorithm.from_wire(reply.arrays))
        reply_content[records.HELD_WEIGHT] = ConfigRecord({"weight": weight})
        return reply_content
    result.arrays = dict(reply.arrays)
    return result.to_record()


def held_upload(content: RecordDict) -> tuple[records.TrainResult, dict[str, Any], int]:
    """Split a `fit` reply with a held upload into (result, adapter to hold, SecAgg+ weight)."""
    result = records.TrainResult.from_record(content)
    held: ArrayRecord = content.array_records[records.HELD_UPLOAD]
    weight = int(records.number(content.config_records[records.HELD_WEIGHT], "weight"))
    return result, records.from_array_record(held), weight
