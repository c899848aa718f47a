"""Per-question records (`fedcollm.evaluation.records`) and base-model evaluations shared across
runs (`fedcollm.evaluation.baselines`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fedcollm.algorithms.steps as steps
from fedcollm.config import build_config
from fedcollm.data import MCRequest
from fedcollm.engines import run_experiment
from fedcollm.evaluation.baselines import BaselineStore
from fedcollm.evaluation.multiple_choice import EncodedRequests, score
from fedcollm.evaluation.records import (
    QUESTIONS_DIR,
    QuestionSet,
    RecordsError,
    from_wire,
    read_question_set,
    read_question_sets,
    to_wire,
    write_question_sets,
)
from fedcollm.experiment.compare import BASELINES_DIR, run_comparison
from fedcollm.lm.lora import adapter_is_identity
from tests.helpers import run_files, tiny_config


def _request(qid: str, choices: tuple[str, ...], gold: int) -> MCRequest:
    return MCRequest(qid, "Question: ?\nAnswer:", tuple(" " + c for c in choices), choices, gold)


REQUESTS = [
    _request("q1", ("a", "much longer"), 1),
    _request("q2", ("yes", "no", "maybe"), 0),
    _request("q3", ("x", "y"), 0),
]
# q1: acc picks "a" (-2.0 > -3.0), acc_norm picks "much longer" (-3/11 > -2/1): the two differ.
LLS = [[-2.0, -3.0], [-0.1 / 3, -1.234567890123456789, -7.5], [-1.0, -1.0]]


def test_records_predict_as_lm_eval_scores() -> None:
    """pred/pred_norm are score()'s argmaxes (ties to the first choice, as np.argmax)."""
    qset = QuestionSet.from_loglikelihoods(2, "slm", None, REQUESTS, LLS)
    encoded = EncodedRequests(
        (), tuple(q for q, r in enumerate(REQUESTS) for _ in r.choice_texts), tuple(REQUESTS)
    )
    result = score(encoded, np.asarray([x for lls in LLS for x in lls]))
    assert [q.pred for q in qset.questions] == result.predictions == [0, 0, 0]
    assert [q.pred_norm for q in qset.questions] == result.predictions_norm == [1, 0, 0]
    assert (qset.acc, qset.acc_norm) == (result.acc, result.acc_norm) == (2 / 3, 1.0)
    assert qset.questions[0].lengths == (1, 11)


def test_records_round_trip_bit_for_bit(tmp_path: Path) -> None:
    sets = [
        QuestionSet.from_loglikelihoods(0, "slm", None, REQUESTS, LLS),
        QuestionSet.from_loglikelihoods(2, "slm", 3, REQUESTS, LLS),
        QuestionSet.from_loglikelihoods(2, "llm", None, REQUESTS, LLS, "heldout"),
    ]
    paths = write_question_sets(tmp_path, sets)
    assert [p.name for p in paths] == [
        "round-0000-slm.jsonl",
        "round-0002-slm-client-3.jsonl",
        "round-0002-llm-heldout.jsonl",
    ]
    assert sorted(read_question_sets(tmp_path), key=lambda s: s.file_name) == sorted(
        sets, key=lambda s: s.file_name
    )
    assert read_question_set(paths[1]).questions[1].loglikelihoods[1] == -1.234567890123456789
    assert read_question_sets(tmp_path / "elsewhere") == []


def test_a_damaged_records_file_is_named_with_its_line(tmp_path: Path) -> None:
    (path,) = write_question_sets(tmp_path, [QuestionSet.from_loglikelihoods(1, "slm", None, REQUESTS, LLS)])
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1].replace('"gold"', '"golden"'), lines[2]]) + "\n")
    with pytest.raises(RecordsError, match=r"round-0001-slm\.jsonl, line 2: .*gold"):
        read_question_set(path)
    path.write_text(lines[0] + "\n" + lines[1].replace('"round": 1', '"round": 2') + "\n")
    with pytest.raises(RecordsError, match="line 2: round/role/client/set"):
        read_question_set(path)


def test_client_log_likelihoods_cross_the_wire_exactly_and_are_checked() -> None:
    arrays = to_wire(LLS)
    assert arrays["questions.loglikelihoods"].dtype == np.float64
    assert from_wire(arrays, REQUESTS, client=1) == LLS
    with pytest.raises(RecordsError, match="client 4 returned 6 log-likelihoods for 7 choices"):
        from_wire(to_wire([[0.0, 0.0], [0.0, 0.0, 0.0], [0.0]]), REQUESTS, client=4)
    with pytest.raises(RecordsError, match="client 2's evaluation reply holds no"):
        from_wire({}, REQUESTS, client=2)


def test_a_shared_store_evaluates_each_base_model_once_and_changes_nothing(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs of different methods share one store: the base models are scored once (the
    second run scores only trained models), and both run folders are byte for byte those of runs
    without a store."""
    base = tiny_config(tiny_llama, tiny_llama_big, federation={"rounds": 1, "num_clients": 2})
    fedavg = build_config({**base, "algorithm": "fedavg"})
    standalone = build_config({**base, "algorithm": "standalone"})
    run_experiment(fedavg, tmp_path / "fedavg-alone")
    run_experiment(standalone, tmp_path / "standalone-alone")

    scored: list[bool] = []  # per scoring: was the model its base model?
    original = steps.sequence_loglikelihoods

    def counting(model, *args, **kwargs):  # type: ignore[no-untyped-def]
        scored.append(adapter_is_identity(model))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(steps, "sequence_loglikelihoods", counting)
    store = BaselineStore(tmp_path / "store")
    run_experiment(fedavg, tmp_path / "fedavg", baselines=store)
    assert scored == [True, False]  # the base SLM (then stored) and the trained global SLM
    scored.clear()
    run_experiment(standalone, tmp_path / "standalone", baselines=store)
    assert scored == [False, False]  # its 2 clients' trained SLMs; round 0 came from the store
    assert (store.hits, store.misses) == (1, 1)
    assert run_files(tmp_path / "fedavg") == run_files(tmp_path / "fedavg-alone")
    assert run_files(tmp_path / "standalone") == run_files(tmp_path / "standalone-alone")


def test_compare_scores_each_base_model_once_per_task(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over the paper's five methods, the SLM's and the LLM's base models are scored once each;
    every method's round 0 and the Zero-Shot row read those scores (their records agree)."""
    base = build_config(tiny_config(tiny_llama, tiny_llama_big, federation={"rounds": 1, "num_clients": 2}))
    scored: list[bool] = []
    original = steps.sequence_loglikelihoods

    def counting(model, *args, **kwargs):  # type: ignore[no-untyped-def]
        scored.append(adapter_is_identity(model))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(steps, "sequence_loglikelihoods", counting)
    methods = ["zeroshot", "standalone", "fedavg", "centralized", "fedcollm"]
    runs = run_comparison(base, tmp_path, run_experiment, methods, ["arc_easy"])
    assert scored.count(True) == 2
    assert len(list((tmp_path / BASELINES_DIR).glob("*.json"))) == 2
    round0: dict[str, set[tuple[int, ...]]] = {"slm": set(), "llm": set()}
    for run in runs:
        for qset in read_question_sets(run.folder):
            if qset.round == 0:
                round0[qset.role].add(tuple(q.pred for q in qset.questions))
        assert (run.folder / QUESTIONS_DIR).is_dir()
    assert len(round0["slm"]) == 1 and len(round0["llm"]) == 1
