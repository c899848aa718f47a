"""FedMKT end to end on tiny models with different tokenizers, and rejection of bad uploads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from peft import PeftModel

from fedcollm.algorithms import ALGORITHMS, check_config
from fedcollm.algorithms.fedmkt import ADAPTER, UP, FedMKT, FedMKTError
from fedcollm.config import ConfigError, ExperimentConfig, build_config
from fedcollm.engines import run_experiment
from fedcollm.lm.loading import load_base_model
from fedcollm.lm.lora import get_adapter
from fedcollm.parties.client import ClientRuntime
from fedcollm.parties.data import ExperimentData
from fedcollm.parties.loading import load_models
from fedcollm.parties.server import ServerRuntime
from fedcollm.protocol import ClientReply, Reporter
from tests.helpers import read_metrics, tiny_config


def fedmkt_config(slm: Path, other: Path, llm: Path, **overrides: object) -> dict:
    """Client 0 runs `slm` (the LLM's tokenizer), client 1 `other` (a different tokenizer)."""
    federation = {"rounds": 2, "num_clients": 2, "client_models": [str(slm), str(other)]}
    return tiny_config(slm, llm, algorithm="fedmkt", federation=federation, **overrides)


class Messages(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


def test_fedmkt_is_registered_with_the_paper_defaults() -> None:
    assert ALGORITHMS["fedmkt"] is FedMKT
    cfg = build_config({"algorithm": "fedmkt"})
    assert (cfg.fedmkt.top_k, cfg.fedmkt.ce_weight, cfg.fedmkt.fedavg_homogeneous) == (16, 0.9, False)


def test_two_rounds_two_clients_with_different_tokenizers(
    tiny_llama: Path, tiny_other_tokenizer: Path, tiny_llama_big: Path, tmp_path: Path
) -> None:
    cfg = build_config(fedmkt_config(tiny_llama, tiny_other_tokenizer, tiny_llama_big))
    out = tmp_path / "run"
    run_experiment(cfg, out)
    metrics = read_metrics(out)
    keys = [(m["round"], m["role"], m["client"], m["metric"]) for m in metrics]
    assert len(keys) == len(set(keys)), "a metric was recorded twice"

    def where(**match: object) -> list[dict]:
        return [m for m in metrics if all(m[k] == v for k, v in match.items())]

    # T = 2 rounds plus the client-only exchange 3 in which clients consume the last S_0
    assert sorted({m["round"] for m in where(role="llm", metric="acc")}) == [0, 1, 2, 3]
    for k in (0, 1):
        assert sorted(m["round"] for m in where(role="slm", client=k, metric="acc")) == [0, 1, 2, 3]
        assert sorted(m["round"] for m in where(role="client", client=k, metric="train_loss")) == [1, 2]
        # ClientUpdate2 on the server's knowledge from round 2 on (incl. the final exchange)
        assert sorted(m["round"] for m in where(role="client", client=k, metric="kd_loss")) == [2, 3]
    assert len(where(role="slm", client=None, metric="acc")) == 4  # the mean over clients
    assert not where(metric="rejected")
    for rnd in (1, 2):
        (selected,) = where(round=rnd, role="llm", metric="selected")
        by_client = where(round=rnd, metric="selected_by_server")
        assert sum(m["value"] for m in by_client) == selected["value"]
        assert np.isfinite(where(round=rnd, role="llm", metric="train_kd")[0]["value"])
    # the LLM's adapter was trained (LoRA B starts at zero)
    llm = PeftModel.from_pretrained(load_base_model(str(tiny_llama_big)), str(out / "adapters" / "llm"))
    assert any(np.abs(a).sum() > 0 for name, a in get_adapter(llm).items() if "lora_B" in name)

    comm = json.loads((out / "communication.json").read_text())
    knowledge = comm["knowledge"]
    assert knowledge["sets_sent"] == 2 * 2 + 2 * 2  # uploads and S_0 downloads, two rounds
    assert knowledge["bytes_sent"] == comm["total_bytes"]  # only knowledge travels
    assert 0 < knowledge["bytes_sent"] < knowledge["dense_bytes_N_S_K"]
    assert knowledge["saving_vs_N_S_K_percent"] > 50
    results = (out / "results.md").read_text()
    assert "| LLM |" in results and "| 1 | " + str(tiny_other_tokenizer) in results
    assert "N·S·K" in results


@pytest.fixture(scope="module")
def round_one(tiny_llama: Path, tiny_other_tokenizer: Path, tiny_llama_big: Path):
    """A server and both clients' genuine round-1 replies, built once for the rejection tests."""
    cfg = build_config(fedmkt_config(tiny_llama, tiny_other_tokenizer, tiny_llama_big))
    algorithm = ALGORITHMS["fedmkt"](cfg)
    data = ExperimentData.load(cfg)
    slm, llm = load_models(cfg, with_llm=True)
    other, _ = load_models(
        cfg.model_copy(update={"slm": cfg.slm.model_copy(update={"name": str(tiny_other_tokenizer)})}), False
    )
    server = ServerRuntime.create(cfg, data, slm, llm)
    clients = [ClientRuntime.create(cfg, data, 0, slm), ClientRuntime.create(cfg, data, 1, other)]
    payload = algorithm.configure_fit(server, 1, Reporter())
    replies = [algorithm.client_fit(c, payload, 1, Reporter()) for c in clients]
    return algorithm, server, replies


def _corrupt(reply: ClientReply, what: str) -> ClientReply:
    arrays = {k: v.copy() for k, v in reply.arrays.items()}
    if what == "nan":
        arrays[UP + "values"][0, 0] = np.nan
    elif what == "vocab":
        arrays[UP + "ids"][2, 1] = 100_000
    elif what == "count":
        arrays[UP + "loss"] = arrays[UP + "loss"][:-1]
        arrays[UP + "lengths"] = arrays[UP + "lengths"][:-1]
    return ClientReply(reply.client, arrays, reply.num_examples, reply.metrics)


@pytest.mark.parametrize(
    ("what", "reason"),
    [("nan", "NaN or infinite"), ("vocab", "outside its vocabulary"), ("count", "the public set has")],
)
def test_a_bad_upload_is_rejected_naming_the_client_and_the_round_goes_on(
    round_one, what: str, reason: str
) -> None:
    algorithm, server, replies = round_one
    bad = [replies[0], _corrupt(replies[1], what)]
    reporter = Messages()
    algorithm.aggregate_fit(server, bad, 1)
    metrics = algorithm.server_update(server, {}, 1, reporter)
    rejected = [m for m in metrics if m.metric == "rejected"]
    assert [(m.role, m.client, m.value) for m in rejected] == [("client", 1, 1.0)]
    assert len(reporter.lines) == 1 and "client 1" in reporter.lines[0] and reason in reporter.lines[0]
    # the server trained on client 0 alone and produced its knowledge for the next round
    by_client = {m.client: m.value for m in metrics if m.metric == "selected_by_server"}
    assert set(by_client) == {0}
    assert any(m.metric == "train_loss" and m.role == "llm" for m in metrics)
    assert any(name.startswith("server.") for name in algorithm.configure_fit(server, 2, Reporter()).arrays)


def test_the_round_stops_when_every_upload_is_rejected(round_one) -> None:
    algorithm, server, replies = round_one
    algorithm.aggregate_fit(server, [_corrupt(r, "nan") for r in replies], 1)
    with pytest.raises(FedMKTError, match=r"round 1: no usable client knowledge set .*client 0.*client 1"):
        algorithm.server_update(server, {}, 1, Reporter())


def test_a_client_sending_nan_in_a_real_run_is_skipped(
    tiny_llama: Path, tiny_other_tokenizer: Path, tiny_llama_big: Path, tmp_path: Path, monkeypatch
) -> None:
    original = FedMKT.client_fit

    def nan_for_client_1(self, client, payload, rnd, reporter):
        reply = original(self, client, payload, rnd, reporter)
        return _corrupt(reply, "nan") if client.client_id == 1 and reply.arrays else reply

    monkeypatch.setattr(FedMKT, "client_fit", nan_for_client_1)
    cfg = fedmkt_config(tiny_llama, tiny_other_tokenizer, tiny_llama_big)
    cfg["federation"]["rounds"] = 1
    cfg["eval"]["every_round"] = False
    run_experiment(build_config(cfg), tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    assert [(m["round"], m["client"]) for m in metrics if m["metric"] == "rejected"] == [(1, 1)]
    assert any(m["round"] == 2 and m["role"] == "slm" and m["client"] == 1 for m in metrics)
    assert "client 1 (round 1)" in (tmp_path / "run" / "results.md").read_text()


def test_fedavg_of_adapters_needs_homogeneous_clients(
    tiny_llama: Path, tiny_other_tokenizer: Path, tiny_llama_big: Path
) -> None:
    cfg = build_config(
        fedmkt_config(tiny_llama, tiny_other_tokenizer, tiny_llama_big, fedmkt={"fedavg_homogeneous": True})
    )
    assert any("same SLM" in problem for problem in FedMKT.check_config(cfg))
    with pytest.raises(ConfigError, match="same SLM"):
        check_config(cfg)


def test_fedavg_of_homogeneous_adapters_honours_the_weighting(tiny_llama: Path, tiny_llama_big: Path) -> None:
    """`fedmkt.fedavg_homogeneous` averages the adapters as `federation.weighting` says."""

    def config(weighting: str) -> ExperimentConfig:
        federation = {"rounds": 1, "num_clients": 2, "weighting": weighting}
        fedmkt = {"fedavg_homogeneous": True}
        return build_config(
            tiny_config(tiny_llama, tiny_llama_big, algorithm="fedmkt", federation=federation, fedmkt=fedmkt)
        )

    cfg = config("examples")
    algorithm = ALGORITHMS["fedmkt"](cfg)
    data = ExperimentData.load(cfg)
    slm, llm = load_models(cfg, with_llm=True)
    server = ServerRuntime.create(cfg, data, slm, llm)
    payload = algorithm.configure_fit(server, 1, Reporter())
    replies = []
    for k, n in ((0, 1), (1, 3)):  # unequal example counts
        reply = algorithm.client_fit(ClientRuntime.create(cfg, data, k, slm), payload, 1, Reporter())
        replies.append(ClientReply(reply.client, reply.arrays, n, reply.metrics))
    a, b = (
        {n.removeprefix(ADAPTER): v for n, v in r.arrays.items() if n.startswith(ADAPTER)} for r in replies
    )
    assert any(not np.allclose(a[n], b[n]) for n in a)
    for weighting, (wa, wb) in (("examples", (0.25, 0.75)), ("uniform", (0.5, 0.5))):
        ALGORITHMS["fedmkt"](config(weighting)).aggregate_fit(server, replies, 1)
        averaged = server.state["adapter_avg"]
        assert list(averaged) == list(a)
        for name, got in averaged.items():
            want = wa * a[name].astype(np.float64) + wb * b[name].astype(np.float64)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_select_teachers_falls_back_to_the_learners_own_rows_only_when_asked() -> None:
    from fedcollm.algorithms.fedmkt.knowledge import KnowledgeSet, select_teachers

    def knowledge(fill: int) -> KnowledgeSet:
        lengths = np.array([1, 2], dtype=np.int32)
        return KnowledgeSet(
            np.zeros(2, np.float32), lengths, np.full((3, 2), fill, np.int32), np.zeros((3, 2), np.float32)
        )

    teacher, own = knowledge(7), knowledge(3)
    chosen = np.array([0, -1])
    assert select_teachers(chosen, [teacher])[1] is None
    with_own = select_teachers(chosen, [teacher], own)
    assert with_own[0] is not None and with_own[0][0].tolist() == [[7, 7]]
    assert with_own[1] is not None and with_own[1][0].tolist() == [[3, 3], [3, 3]]


@pytest.mark.parametrize("target", ["none", "own"])
def test_no_teacher_target_decides_whether_every_public_sample_carries_kd(
    tiny_llama: Path,
    tiny_other_tokenizer: Path,
    tiny_llama_big: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    target: str,
) -> None:
    """With "own" (FATE-LLM's reference) a sample no teacher beats distils toward the learner's own
    distribution, so the LLM and every client get a KD target for every public sample; with
    "none" (default) only DualMinCE's selected samples do, as many as the `selected` metrics say."""
    from fedcollm.algorithms.fedmkt import algorithm as fedmkt_algorithm

    calls: list[list[object]] = []
    real = fedmkt_algorithm.train_with_knowledge

    def spy(model: object, examples: object, teachers: list[object], **kwargs: object) -> object:
        calls.append(list(teachers))
        return real(model, examples, teachers, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fedmkt_algorithm, "train_with_knowledge", spy)
    overrides = {"fedmkt": {"no_teacher_target": target}}
    cfg = build_config(fedmkt_config(tiny_llama, tiny_other_tokenizer, tiny_llama_big, **overrides))
    run_experiment(cfg, tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    selected = [m["value"] for m in metrics if m["metric"] in ("selected", "kd_selected")]
    assert len(calls) == len(selected) == 2 + 2 * 2  # the LLM in rounds 1-2, both clients in 2-3
    with_teacher = [sum(t is not None for t in teachers) for teachers in calls]
    assert min(selected) < len(calls[0])  # some sample had no teacher better than the learner
    if target == "own":
        assert all(n == len(teachers) for n, teachers in zip(with_teacher, calls, strict=True))
    else:
        assert sorted(with_teacher) == sorted(int(v) for v in selected)
