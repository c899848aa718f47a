"""The server side of the Flower engine against in-process SuperNodes: who is which client."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from fedcollm.config import build_config
from fedcollm.engines.flower import FlowerEngineError, FlowerOptions
from fedcollm.engines.flower.transport import FlowerTransport
from tests.helpers import NodesGrid, nodes, tiny_config


def transport(node_configs: list[dict], num_clients: int = 3) -> FlowerTransport:
    config = build_config(
        tiny_config(Path("slm"), Path("llm"), federation={"rounds": 1, "num_clients": num_clients})
    )
    return FlowerTransport(NodesGrid(node_configs), config, FlowerOptions(connect_timeout=0.0))  # type: ignore[arg-type]


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


def _node_checkpoint(folder: Path, rnd: int) -> dict:
    """The client state a ClientApp checkpointed on its node after round `rnd` (decoded)."""
    import json

    from fedcollm.experiment.checkpoint import CHECKPOINT_DIR, load_checkpoint

    saved = folder / CHECKPOINT_DIR / f"round-{rnd:04d}"
    key = json.loads((saved / "meta.json").read_text())["experiment_key"]
    return load_checkpoint(saved, key).state["client"]


def test_client_state_survives_fresh_clientapp_processes_and_a_round_sent_again(
    tiny_llama: Path, server_identity: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Standalone keeps each client's own adapter between rounds; a process that answers a
    message may be fresh (a ClientApp without a node worker, a restarted worker), so it must come
    back from the node's checkpoint — exactly what the algorithm's `client_state` hook returns,
    nothing guessed — and a round sent again (a resumed ServerApp) starts from the state of the
    round before, not from the state it left."""
    import numpy as np

    from fedcollm.engines.flower import client_work
    from fedcollm.lm.lora import get_adapter
    from fedcollm.parties.loading import load_models
    from fedcollm.protocol import Payload

    config = build_config(
        tiny_config(
            tiny_llama, tiny_llama, algorithm="standalone", federation={"rounds": 2, "num_clients": 2}
        )
    )
    homes = {k: tmp_path / f"node-{k}" for k in (0, 1)}
    grid = NodesGrid([{**cfg, "state-dir": str(homes[k])} for k, cfg in enumerate(nodes(0, 1, total=2))])
    in_process = FlowerOptions(node_worker=False)
    flower = FlowerTransport(grid, config, in_process)  # type: ignore[arg-type]
    flower.connect()
    start = load_models(config, with_llm=False)[0]

    first = flower.fit(Payload(get_adapter(start.model), {"round": 1}), 1)
    for reply in first:
        node_config = grid.contexts[200 + reply.client].node_config
        folder = client_work.client_state_dir(node_config, flower.instance, reply.client)
        assert folder.is_relative_to(homes[reply.client]), "each node checkpoints in its own folder"
        kept = _node_checkpoint(folder, 1)
        assert sorted(kept) == ["adapter"]  # Standalone's client_state_keys, and nothing else
        assert all(np.array_equal(kept["adapter"][k], reply.arrays[k]) for k in reply.arrays)
    monkeypatch.setattr(client_work, "_BUILT", {})  # a fresh ClientApp process: nothing in memory
    second = flower.fit(Payload({}, {"round": 2}), 2)
    assert [r.client for r in second] == [0, 1]
    assert all(
        not np.array_equal(a.arrays[k], b.arrays[k])
        for a, b in zip(first, second, strict=True)
        for k in a.arrays
    )
    monkeypatch.setattr(client_work, "_BUILT", {})
    again = flower.fit(Payload({}, {"round": 2}), 2)
    assert all(
        np.array_equal(a.arrays[k], b.arrays[k]) for a, b in zip(second, again, strict=True) for k in a.arrays
    )
    other_run = FlowerTransport(grid, config, in_process)  # type: ignore[arg-type]
    other_run.connect()
    assert other_run.instance != flower.instance
    monkeypatch.setattr(client_work, "_BUILT", {})
    fresh = other_run.fit(Payload(get_adapter(start.model), {"round": 1}), 1)
    assert all(
        np.array_equal(a.arrays[k], b.arrays[k]) for a, b in zip(first, fresh, strict=True) for k in a.arrays
    ), "a new run uses none of another run's checkpoints"


def test_client_state_belongs_to_its_experiment_and_unstorable_state_is_refused(
    tiny_llama: Path, tmp_path: Path
) -> None:
    import numpy as np

    from fedcollm.algorithms import ALGORITHMS
    from fedcollm.engines.flower.client_work import restore_client_state, save_client_state
    from fedcollm.experiment.checkpoint import CheckpointError
    from fedcollm.experiment.state import StateError

    config = build_config(tiny_config(tiny_llama, tiny_llama, algorithm="standalone"))
    algorithm = ALGORITHMS["standalone"](config)
    folder = tmp_path / "client-0"
    client = SimpleNamespace(client_id=0, state={"adapter": {"w": np.arange(3.0)}, "cache": object()})
    save_client_state(algorithm, client, folder, key="experiment-a", rnd=1)  # type: ignore[arg-type]
    client.state["adapter"] = {"w": np.arange(3.0) + 10}
    save_client_state(algorithm, client, folder, key="experiment-a", rnd=2)  # type: ignore[arg-type]
    fresh = SimpleNamespace(client_id=0, state={"adapter": "stale"})
    assert restore_client_state(algorithm, fresh, folder, key="experiment-a", up_to=0) is None  # type: ignore[arg-type]
    assert fresh.state == {}, "before any checkpoint a client starts as a run starts it"
    assert restore_client_state(algorithm, fresh, folder, key="experiment-a", up_to=1) == 1  # type: ignore[arg-type]
    assert list(fresh.state) == ["adapter"] and np.array_equal(fresh.state["adapter"]["w"], np.arange(3.0))
    assert restore_client_state(algorithm, fresh, folder, key="experiment-a", up_to=5) == 2  # type: ignore[arg-type]
    assert np.array_equal(fresh.state["adapter"]["w"], np.arange(3.0) + 10)
    with pytest.raises(CheckpointError, match="another experiment"):
        restore_client_state(algorithm, fresh, folder, key="experiment-b", up_to=2)  # type: ignore[arg-type]

    client.state["adapter"] = {"w": object()}  # a value a checkpoint cannot hold
    with pytest.raises(StateError, match=r"client 0's state/adapter/w holds a object"):
        save_client_state(algorithm, client, folder, key="experiment-a", rnd=3)  # type: ignore[arg-type]
