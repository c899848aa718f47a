"""Each baseline's defining property, on tiny models through the embedded engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedcollm.algorithms import ALGORITHMS
from fedcollm.config import build_config
from fedcollm.engines import run_experiment
from fedcollm.parties.client import ClientRuntime
from fedcollm.parties.data import ExperimentData
from fedcollm.parties.server import ServerRuntime
from fedcollm.protocol import ClientReply
from tests.helpers import read_metrics, tiny_config


@pytest.fixture
def spy_fit(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int, tuple[int, ...]]]:
    """Record (algorithm, round, client, ids of the examples it trained on) for every client step."""
    import fedcollm.algorithms.baselines.fedavg as fedavg
    import fedcollm.algorithms.baselines.standalone as standalone

    calls: list[tuple[str, int, int, tuple[int, ...]]] = []
    original = standalone.train_client_adapter

    def spy(config, client: ClientRuntime, payload, rnd, reporter) -> ClientReply:  # type: ignore[no-untyped-def]
        calls.append((config.algorithm, rnd, client.client_id, tuple(r.id for r in client.requests)))
        return original(config, client, payload, rnd, reporter)

    monkeypatch.setattr(standalone, "train_client_adapter", spy)
    monkeypatch.setattr(fedavg, "train_client_adapter", spy)
    return calls


def test_all_paper_methods_are_registered() -> None:
    assert {"zeroshot", "standalone", "fedavg", "centralized", "fedcollm"} <= set(ALGORITHMS)


def test_zeroshot_trains_nothing_and_evaluates_both_models(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path
) -> None:
    run_experiment(
        build_config(tiny_config(tiny_llama, tiny_llama_big, algorithm="zeroshot")), tmp_path / "r"
    )
    metrics = read_metrics(tmp_path / "r")
    assert {m["round"] for m in metrics} == {0}
    assert {m["role"] for m in metrics} == {"slm", "llm"}


def test_standalone_clients_never_see_another_shard_nor_an_average(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path, spy_fit: list
) -> None:
    cfg = build_config(tiny_config(tiny_llama, tiny_llama_big, algorithm="standalone"))
    run_experiment(cfg, tmp_path / "r")
    data = ExperimentData.load(cfg)
    shards = {k: {data.train[i].id for i in data.split.clients[k]} for k in range(2)}
    for _, _, client, ids in spy_fit:
        assert set(ids) == shards[client]
    assert not shards[0] & shards[1]
    metrics = read_metrics(tmp_path / "r")
    per_client = [m for m in metrics if m["round"] == 2 and m["metric"] == "acc" and m["client"] is not None]
    mean = [m for m in metrics if m["round"] == 2 and m["metric"] == "acc" and m["client"] is None]
    assert len(per_client) == 2 and len(mean) == 1
    assert mean[0]["value"] == pytest.approx(np.mean([m["value"] for m in per_client]))


def test_standalone_client_continues_from_its_own_adapter(tiny_llama: Path, tiny_llama_big: Path) -> None:
    cfg = build_config(tiny_config(tiny_llama, tiny_llama_big, algorithm="standalone"))
    algorithm = ALGORITHMS["standalone"](cfg)
    from fedcollm.parties.loading import load_models
    from fedcollm.protocol import Reporter

    data = ExperimentData.load(cfg)
    slm, _ = load_models(cfg, with_llm=False)
    server = ServerRuntime.create(cfg, data, slm, None)
    clients = [ClientRuntime.create(cfg, data, k, slm) for k in range(2)]
    first = [
        algorithm.client_fit(c, algorithm.configure_fit(server, 1, Reporter()), 1, Reporter())
        for c in clients
    ]
    assert algorithm.configure_fit(server, 2, Reporter()).arrays == {}  # nothing is broadcast after round 1
    second = algorithm.client_fit(clients[0], algorithm.configure_fit(server, 2, Reporter()), 2, Reporter())
    kept = clients[0].state["adapter"]  # the client's own float32 adapter, as it uploaded it
    assert list(kept) == list(second.arrays)
    assert all(np.array_equal(kept[k], second.arrays[k]) for k in kept)
    assert any(not np.array_equal(first[0].arrays[k], second.arrays[k]) for k in second.arrays)


def test_fedavg_server_step_is_a_pure_average(tiny_llama: Path, tiny_llama_big: Path) -> None:
    cfg = build_config(tiny_config(tiny_llama, tiny_llama_big, algorithm="fedavg"))
    algorithm = ALGORITHMS["fedavg"](cfg)
    from fedcollm.parties.loading import load_models
    from fedcollm.protocol import Reporter

    data = ExperimentData.load(cfg)
    slm, _ = load_models(cfg, with_llm=False)
    server = ServerRuntime.create(cfg, data, slm, None)
    rng = np.random.default_rng(0)
    replies = [
        ClientReply(
            k, {n: rng.normal(size=a.shape).astype(np.float32) for n, a in server.global_adapter.items()}, n
        )
        for k, n in ((0, 1), (1, 3))
    ]
    aggregate = algorithm.aggregate_fit(server, replies, 1)
    assert algorithm.server_update(server, aggregate, 1, Reporter()) == []
    for name in aggregate:
        expected = (replies[0].arrays[name] * 1 + replies[1].arrays[name] * 3) / 4
        np.testing.assert_allclose(server.global_adapter[name], expected, rtol=1e-6, atol=1e-7)


def test_centralized_trains_the_llm_on_every_shard_and_the_aux_set(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path, spy_fit: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedcollm.algorithms.steps as steps

    trained_on: list[int] = []
    original = steps.train_sft

    def spy(model, examples, **kwargs):
        trained_on.append(len(examples))
        return original(model, examples, **kwargs)

    monkeypatch.setattr(steps, "train_sft", spy)  # every SFT of an algorithm goes through steps
    cfg = build_config(
        tiny_config(
            tiny_llama, tiny_llama_big, algorithm="centralized", federation={"rounds": 1, "num_clients": 2}
        )
    )
    run_experiment(cfg, tmp_path / "r")
    assert spy_fit == []  # no client ever trains
    assert trained_on == [cfg.task.train_limit]  # one epoch over all 24 training questions
    data = ExperimentData.load(cfg)
    union = set(data.split.aux).union(*map(set, data.split.clients))
    assert union == set(range(len(data.train)))
    assert {m["role"] for m in read_metrics(tmp_path / "r")} == {"llm"}
