"""The ClientApp: a SuperNode's side of a fedcollm run.

The SuperNode's node config says which client it is (`partition-id`, `num-partitions`). Every
`train.local` message carries the resolved experiment TOML, from which the client rebuilds its
`ClientRuntime` (its own partition of the data, encoded; the SLM from the local converted-model
cache) and then calls the algorithm's own `client_fit` — the same call the embedded engine makes,
with the same seeds, so the update is identical. The client's data never leaves this process:
only the adapter (or, under SecAgg+, its masked form) is sent back.

In deployment each message runs in a fresh process, so nothing is cached across messages there;
in simulation a Ray actor serves many messages and keeps what it built (one SLM per process,
shared by the partitions it serves, as in the embedded engine).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Parameters, Status, ndarray_to_bytes
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from fedcollm.engines.flower import records

if TYPE_CHECKING:
    from fedcollm.algorithms.base import Algorithm
    from fedcollm.config import ExperimentConfig
    from fedcollm.parties.runtime import ClientReply, ClientRuntime

app = ClientApp()


def _partition(context: Context) -> tuple[int, int]:
    config = context.node_config
    if "partition-id" not in config or "num-partitions" not in config:
        raise ValueError(
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


# ------------------------------------------------------------------------------------------
# Client runtimes, rebuilt from the experiment TOML (cached within one process).

_RUNTIMES: dict[tuple[str, int], ClientRuntime] = {}
_SHARED: dict[str, Any] = {}
_STATE_ARRAYS = "fedcollm.state."
_STATE_SCALARS = "fedcollm.state"


def _runtime(experiment: str, client: int, context: Context) -> tuple[ExperimentConfig, ClientRuntime]:
    """This client's runtime for `experiment`, with its state restored from the node state."""
    import tomllib

    from fedcollm.config import build_config
    from fedcollm.lm.models import load_with_lora
    from fedcollm.parties.runtime import ClientRuntime, ExperimentData, derive_seed, torch_dtype

    config = build_config(tomllib.loads(experiment), "<experiment sent by the server>")
    _, num_clients = _partition(context)
    if num_clients != config.federation.num_clients:
        raise ValueError(
            f"node config num-partitions={num_clients} but the experiment has "
            f"{config.federation.num_clients} clients"
        )
    key = hashlib.sha256(experiment.encode()).hexdigest()
    if _SHARED.get("key") != key:
        _RUNTIMES.clear()
        _SHARED.clear()
        _quiet()
        _SHARED.update(key=key, data=ExperimentData.load(config), models={})
    if (key, client) not in _RUNTIMES:
        # The same model, LoRA shape and seed as the embedded engine's `load_client_models`.
        name = config.federation.client_model(client, config.slm.name)
        models = _SHARED["models"]
        if name not in models:
            models[name] = load_with_lora(
                name, config.slm.lora, derive_seed(config.seed, 1), torch_dtype(config.dtype)
            )
        _RUNTIMES[key, client] = ClientRuntime.create(config, _SHARED["data"], client, models[name])
    runtime = _RUNTIMES[key, client]
    _restore_state(runtime, context)
    return config, runtime


def _restore_state(runtime: ClientRuntime, context: Context) -> None:
    """Bring back what the algorithm kept in `client.state` in earlier messages.

    In deployment every message runs in a fresh process; Flower keeps the node's `Context.state`
    between them. Adapters (named arrays) and scalars survive; other values (caches) are rebuilt.
    """
    for name, record in context.state.array_records.items():
        if name.startswith(_STATE_ARRAYS):
            runtime.state[name.removeprefix(_STATE_ARRAYS)] = records.from_array_record(record)
    if _STATE_SCALARS in context.state.config_records:
        runtime.state.update(context.state.config_records[_STATE_SCALARS])


def _save_state(runtime: ClientRuntime, context: Context) -> None:
    """Keep `client.state`'s adapters and scalars in the node state (the inverse of restore)."""
    for name in [n for n in context.state if n.startswith(_STATE_ARRAYS) or n == _STATE_SCALARS]:
        del context.state[name]
    scalars: dict[str, Any] = {}
    for name, value in runtime.state.items():
        if isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
            context.state[_STATE_ARRAYS + name] = records.to_array_record(value)
        elif isinstance(value, (bool, int, float, str)):
            scalars[name] = value
    if scalars:
        context.state[_STATE_SCALARS] = ConfigRecord(scalars)


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _run_client_hook(
    hook: Literal["client_fit", "client_evaluate"], msg: Message, context: Context
) -> tuple[Algorithm, records.TrainRequest, ClientReply]:
    """Decode a request, run the algorithm's client hook on this node's runtime, keep its state."""
    from fedcollm.algorithms import ALGORITHMS
    from fedcollm.parties.runtime import Payload, Reporter

    client_id, _ = _partition(context)
    request = records.TrainRequest.from_record(msg.content)
    config, client = _runtime(request.experiment, client_id, context)
    algorithm = ALGORITHMS[config.algorithm](config)
    payload = Payload(arrays=request.arrays, config=request.config)
    reply = getattr(algorithm, hook)(client, payload, request.rnd, Reporter())
    _save_state(client, context)
    return algorithm, request, reply


@app.train("local")
def train_local(msg: Message, context: Context) -> Message:
    """One round's local update, by the algorithm's own `client_fit`."""
    algorithm, request, reply = _run_client_hook("client_fit", msg, context)
    result = records.TrainResult(
        client=reply.client, num_examples=reply.num_examples, metrics=dict(reply.metrics)
    )
    if request.hold:
        # Keep the adapter on this node; it leaves only masked, through SecAgg+, which quantises
        # float values itself: hold it decoded from the transport dtype (a bfloat16 upload is a
        # uint16 bit pattern that SecAgg+ must not take for numbers).
        held = algorithm.from_wire(reply.arrays)
        context.state[records.HELD_ARRAYS] = records.to_array_record(held)
        context.state[records.HELD_META] = ConfigRecord(
            {"round": request.rnd, "num_examples": reply.num_examples}
        )
        result.names = list(held)
        result.bound = records.magnitude_bound(held)
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
    """SecAgg+'s 'collect masked vectors' stage: hand the held adapter to the mod to mask.

    `secaggplus_mod` answers the other stages itself; it calls this only to get the vector to
    quantise and mask, so the held adapter is read here and dropped from the node state.
    """
    if records.HELD_ARRAYS not in context.state.array_records:
        raise RuntimeError(
            "SecAgg+ asked for an upload but this node holds no trained adapter (a "
            "train.local message with hold must come first)"
        )
    held = records.from_array_record(context.state.array_records[records.HELD_ARRAYS])
    meta = context.state.config_records[records.HELD_META]
    del context.state[records.HELD_ARRAYS], context.state[records.HELD_META]
    asked = recorddict_to_fitins(msg.content, keep_input=True).config.get("round")
    if asked is not None and int(asked) != int(meta["round"]):
        raise RuntimeError(f"SecAgg+ round {asked} asked for the adapter of round {meta['round']}")
    # float64: SecAgg+ scales and quantises in the arrays' own precision, and float32 would lose
    # several quantisation levels per value at 2**30 levels.
    tensors = [ndarray_to_bytes(a.astype(np.float64)) for a in held.values()]
    parameters = Parameters(tensors=tensors, tensor_type="numpy.ndarray")
    fitres = FitRes(
        status=Status(code=Code.OK, message="held adapter"),
        parameters=parameters,
        num_examples=int(meta["num_examples"]),
        metrics={},
    )
    return Message(fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
