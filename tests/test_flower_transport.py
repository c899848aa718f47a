"""The server side of the Flower engine against in-process SuperNodes: who is which client."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.app import Context, Error, Message, RecordDict

from fedcollm.config import build_config
from fedcollm.engines.flower import FlowerEngineError, FlowerOptions
from fedcollm.engines.flower.client_app import app
from fedcollm.engines.flower.transport import FlowerTransport
from tests.helpers import tiny_config


class NodesGrid:
    """SuperNodes with the given node configs, answering through the real ClientApp."""

    def __init__(self, node_configs: list[dict]) -> None:
        self.contexts = {
            200 + i: Context(run_id=1, node_id=200 + i, node_config=cfg, state=RecordDict(), run_config={})
            for i, cfg in enumerate(node_configs)
        }
        self.replies: dict[str, object] = {}
        self.run = SimpleNamespace(run_id=1)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:  # type: ignore[no-untyped-def]
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            ids.append(message.metadata.message_id)
            context = self.contexts[message.metadata.dst_node_id]
            try:
                reply = app(message=message, context=context)
            except Exception as exc:  # as Flower's runtime does: an error reply
                reply = Message(Error(code=2, reason=str(exc)), reply_to=message)
            self.replies[ids[-1]] = reply
        return ids

    def pull_messages(self, ids) -> list:  # type: ignore[no-untyped-def]
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def transport(node_configs: list[dict], num_clients: int = 3) -> FlowerTransport:
    config = build_config(
        tiny_config(Path("slm"), Path("llm"), federation={"rounds": 1, "num_clients": num_clients})
    )
    return FlowerTransport(NodesGrid(node_configs), config, FlowerOptions(connect_timeout=0.0))  # type: ignore[arg-type]


def nodes(*ids: int, total: int = 3) -> list[dict]:
    return [{"partition-id": i, "num-partitions": total} for i in ids]


def test_supernodes_are_matched_to_clients_by_their_node_config(server_identity: None) -> None:
    flower = transport(nodes(2, 0, 1))
    flower.connect()
    assert sorted(flower.clients.values()) == [0, 1, 2]
    assert flower.clients == {200: 2, 201: 0, 202: 1}


@pytest.mark.parametrize(
    ("configs", "message"),
    [
        (nodes(0, 1, 1), "both have partition-id=1"),
        (nodes(0, 1, 2, total=4), "num-partitions=4"),
        (nodes(0, 5, 1), "partition-id=5"),
        (
            [{"partition-id": 0, "num-partitions": 3}, {}, {"partition-id": 2, "num-partitions": 3}],
            "which client",
        ),
        (nodes(0, 1), r"only 2 of 3 SuperNodes connected.*missing partition-id \[2\]"),
    ],
)
def test_misconfigured_supernodes_are_refused_with_a_clear_message(
    configs: list[dict], message: str, server_identity: None
) -> None:
    with pytest.raises(FlowerEngineError, match=message):
        transport(configs).connect()


def _node_state(context: Context) -> dict:
    """The client state a ClientApp kept in a node's state (decoded)."""
    import json

    from fedcollm.engines.flower import client_app, records
    from fedcollm.experiment.state import unflatten_state

    saved = context.state.config_records[client_app.STATE_LAYOUT]
    arrays = records.from_array_record(context.state.array_records[client_app.STATE_ARRAYS])
    return unflatten_state(json.loads(str(saved["layout"])), arrays)


def test_client_state_survives_fresh_clientapp_processes(
    tiny_llama: Path, server_identity: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Standalone keeps each client's own adapter between rounds; in deployment every message
    runs in a fresh process, so it must come back from Flower's node state — exactly what the
    algorithm's `client_state` hook returns, nothing guessed."""
    import numpy as np

    from fedcollm.engines.flower import client_app
    from fedcollm.lm.lora import get_adapter
    from fedcollm.parties.loading import load_models
    from fedcollm.protocol import Payload

    config = build_config(
        tiny_config(
            tiny_llama, tiny_llama, algorithm="standalone", federation={"rounds": 2, "num_clients": 2}
        )
    )
    grid = NodesGrid(nodes(0, 1, total=2))
    flower = FlowerTransport(grid, config, FlowerOptions())  # type: ignore[arg-type]
    flower.connect()
    start = load_models(config, with_llm=False)[0]

    first = flower.fit(Payload(get_adapter(start.model), {"round": 1}), 1)
    for reply in first:
        kept = _node_state(grid.contexts[200 + reply.client])
        assert sorted(kept) == ["adapter"]  # Standalone's client_state_keys, and nothing else
        assert all(np.array_equal(kept["adapter"][k], reply.arrays[k]) for k in reply.arrays)
    monkeypatch.setattr(client_app, "_BUILT", {})  # a fresh ClientApp process: nothing in memory
    second = flower.fit(Payload({}, {"round": 2}), 2)
    assert [r.client for r in second] == [0, 1]
    assert all(
        not np.array_equal(a.arrays[k], b.arrays[k])
        for a, b in zip(first, second, strict=True)
        for k in a.arrays
    )


def test_client_state_belongs_to_its_experiment_and_unstorable_state_is_refused(tiny_llama: Path) -> None:
    import numpy as np

    from fedcollm.algorithms import ALGORITHMS
    from fedcollm.engines.flower.client_app import restore_client_state, save_client_state
    from fedcollm.experiment.state import StateError

    config = build_config(tiny_config(tiny_llama, tiny_llama, algorithm="standalone"))
    algorithm = ALGORITHMS["standalone"](config)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    client = SimpleNamespace(client_id=0, state={"adapter": {"w": np.arange(3.0)}, "cache": object()})
    save_client_state(algorithm, client, context, key="experiment-a")  # type: ignore[arg-type]
    fresh = SimpleNamespace(client_id=0, state={})
    restore_client_state(algorithm, fresh, context, key="experiment-b")  # type: ignore[arg-type]
    assert fresh.state == {}, "another experiment's state is never restored"
    restore_client_state(algorithm, fresh, context, key="experiment-a")  # type: ignore[arg-type]
    assert list(fresh.state) == ["adapter"] and np.array_equal(fresh.state["adapter"]["w"], np.arange(3.0))

    client.state["adapter"] = {"w": object()}  # a value a node state cannot hold
    with pytest.raises(StateError, match=r"client 0's state/adapter/w holds a object"):
        save_client_state(algorithm, client, context, key="experiment-a")  # type: ignore[arg-type]
