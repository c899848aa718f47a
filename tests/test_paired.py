"""Paired comparisons (`fedcollm.experiment.paired`) and their tables and plots in `fedcollm compare`'s
report: checked against scipy on constructed cases and against hand counts."""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.axes
import numpy as np
import pytest
from scipy import stats

from fedcollm.evaluation.records import QuestionRecord, QuestionSet, write_question_sets
from fedcollm.experiment import report as report_module
from fedcollm.experiment.paired import (
    N_RESAMPLES,
    SEED,
    PairingError,
    Side,
    bootstrap_interval,
    compare,
    final_sets,
    mcnemar,
    pool,
    side,
    sign_flip_p,
)
from fedcollm.experiment.report import RunRef, write_report


def _ids(n: int) -> list[str]:
    return [f"q{i:03d}" for i in range(n)]


def _record(qid: str, right: bool, right_norm: bool | None = None) -> QuestionRecord:
    right_norm = right if right_norm is None else right_norm
    return QuestionRecord(
        id=qid,
        gold=0,
        pred=0 if right else 1,
        pred_norm=0 if right_norm else 1,
        loglikelihoods=(-1.0, -2.0) if right else (-2.0, -1.0),
        lengths=(4, 4),
    )


def _qset(
    correct: Sequence[bool],
    correct_norm: Sequence[bool] | None = None,
    *,
    rnd: int = 2,
    role: str = "slm",
    client: int | None = None,
    ids: Sequence[str] | None = None,
    shuffle: int | None = None,
) -> QuestionSet:
    """A set whose question ids[i] is right iff correct[i]; `shuffle` writes them in another order."""
    ids = list(ids or _ids(len(correct)))
    norm = list(correct if correct_norm is None else correct_norm)
    records = [_record(q, bool(c), bool(cn)) for q, c, cn in zip(ids, correct, norm, strict=True)]
    if shuffle is not None:
        random.Random(shuffle).shuffle(records)
    return QuestionSet(rnd, role, client, "eval", tuple(records))


def _side(label: str, *rows: Sequence[bool], clients: Sequence[int] | None = None) -> Side:
    if clients is None:
        return side(label, [_qset(rows[0])])
    return side(label, [_qset(r, client=c) for r, c in zip(rows, clients, strict=True)])


def _scipy_interval(differences: np.ndarray) -> tuple[float, float]:
    result = stats.bootstrap(
        (differences,),
        np.mean,
        n_resamples=N_RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(SEED),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


# -- McNemar ---------------------------------------------------------------------------------


def test_mcnemar_on_a_hand_computed_case() -> None:
    """b = 5, c = 1: the two-sided exact p sums the Binomial(6, 1/2) outcomes as likely as 5 or
    less: k = 0, 1, 5, 6, that is (1 + 6 + 6 + 1) / 64."""
    a = np.array([1, 1, 1, 1, 1, 0, 1, 1, 0, 0], dtype=bool)
    b = np.array([0, 0, 0, 0, 0, 1, 1, 1, 0, 0], dtype=bool)
    test = mcnemar(a, b)
    assert (test.b, test.c) == (5, 1)
    assert test.p == pytest.approx(14 / 64, rel=1e-12)
    assert test.p == pytest.approx(stats.binomtest(5, 6, 0.5).pvalue, rel=1e-12)
    swapped = mcnemar(b, a)  # b and c swap, p stays
    assert (swapped.b, swapped.c) == (1, 5) and swapped.p == pytest.approx(test.p, rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_mcnemar_agrees_with_scipy_binomtest_on_random_pairs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.random(200) < 0.55, rng.random(200) < 0.45
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    test = mcnemar(a, b)
    assert (test.b, test.c) == (only_a, only_b)
    assert test.p == stats.binomtest(only_a, only_a + only_b, 0.5).pvalue


def test_identical_answers_are_all_ties() -> None:
    right = np.random.default_rng(3).random(120) < 0.5
    result = compare(_side("A", right), _side("B", right))
    assert (result.delta, result.ci_low, result.ci_high) == (0.0, 0.0, 0.0)
    assert (result.b, result.c, result.p) == (0, 0, 1.0)
    assert bootstrap_interval(np.zeros(7)) == (0.0, 0.0)


@pytest.mark.parametrize("k", [1, 2, 3, 6, 12, 20])
def test_one_sided_flips(k: int) -> None:
    """A right wherever B is, plus k more: b = k, c = 0, p = binomtest(k, k) = 2 * 0.5**k."""
    n = 300
    b_right = np.zeros(n, dtype=bool)
    b_right[::3] = True  # B gets 100 right
    a_right = b_right.copy()
    a_right[np.flatnonzero(~b_right)[:k]] = True
    result = compare(_side("A", a_right), _side("B", b_right))
    assert (result.b, result.c) == (k, 0)
    assert result.p == stats.binomtest(k, k, 0.5).pvalue == pytest.approx(min(1.0, 2 * 0.5**k), rel=1e-12)
    assert result.delta == pytest.approx(100 * k / n)
    assert (result.ci_low, result.ci_high) == pytest.approx(
        tuple(100 * x for x in _scipy_interval(a_right.astype(float) - b_right))
    )
    assert 0 <= result.ci_low <= result.delta <= result.ci_high
    if k <= 3:  # under 2.5 % of resamples draw none of the flips only from k = 4 on
        assert result.ci_low == 0.0  # (BCa would exclude 0 at k = 3, where McNemar's p is 0.25)
    if k >= 12:
        assert result.ci_low > 0 and result.p < 0.001


def test_every_question_flipped_one_way_is_a_point_interval() -> None:
    """A constant difference vector: scipy's BCa gives NaN here; the interval is [Δ, Δ]."""
    n = 15
    result = compare(_side("A", [True] * n), _side("B", [False] * n))
    assert (result.delta, result.ci_low, result.ci_high) == (100.0, 100.0, 100.0)
    assert (result.b, result.c) == (n, 0) and result.p == stats.binomtest(n, n).pvalue


# -- the bootstrap ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_the_interval_is_scipys_paired_bootstrap(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.random(150) < 0.6, rng.random(150) < 0.5
    result = compare(_side("A", a), _side("B", b))
    low, high = _scipy_interval(a.astype(float) - b)
    assert (result.ci_low, result.ci_high) == (100 * low, 100 * high)

    def difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean(x, axis=axis) - np.mean(y, axis=axis)

    two_sample = stats.bootstrap(
        (a.astype(float), b.astype(float)),
        difference,
        paired=True,
        n_resamples=N_RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(SEED),
    ).confidence_interval
    assert result.ci_low == pytest.approx(100 * two_sample.low, abs=1e-9)
    assert result.ci_high == pytest.approx(100 * two_sample.high, abs=1e-9)
    assert result.ci_low <= result.delta <= result.ci_high
    assert result.delta == pytest.approx(100 * (a.mean() - b.mean()))


def test_the_interval_matches_the_normal_approximation_on_many_questions() -> None:
    """An independent check: at n = 3000 the percentile interval is close to mean ± 1.96 sd/√n."""
    rng = np.random.default_rng(11)
    a, b = rng.random(3000) < 0.6, rng.random(3000) < 0.55
    d = a.astype(float) - b
    result = compare(_side("A", a), _side("B", b))
    half = 100 * 1.959964 * d.std(ddof=1) / np.sqrt(d.size)
    assert result.ci_low == pytest.approx(100 * d.mean() - half, abs=0.15)
    assert result.ci_high == pytest.approx(100 * d.mean() + half, abs=0.15)


# -- pairing by question id ------------------------------------------------------------------


def test_pairing_is_by_question_id_not_by_order() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.random(80) < 0.6, rng.random(80) < 0.4
    plain = compare(side("A", [_qset(a)]), side("B", [_qset(b)]))
    shuffled = compare(side("A", [_qset(a, shuffle=1)]), side("B", [_qset(b, shuffle=2)]))
    assert shuffled == plain
    assert (plain.b, plain.c) == (int(np.sum(a & ~b)), int(np.sum(b & ~a)))


def test_sets_of_other_questions_are_refused_naming_both_runs() -> None:
    a = side("the FedAvg run runs/x", [_qset([True, False, True])])
    b = side("the Standalone run runs/y", [_qset([True, True, True], ids=["q000", "q001", "q999"])])
    with pytest.raises(PairingError, match=r"FedAvg run runs/x and the Standalone run runs/y .*q002.*q999"):
        compare(a, b)
    with pytest.raises(PairingError, match="repeat"):
        side("A", [_qset([True, False], ids=["q1", "q1"])])
    with pytest.raises(PairingError, match="other questions"):
        side("A", [_qset([True, False], client=0), _qset([True, False], client=1, ids=["q0", "q9"])])
    with pytest.raises(PairingError, match="one set per client"):
        side("A", [_qset([True, False]), _qset([True, False], client=1)])


# -- a side of several client models --------------------------------------------------------


def test_per_client_models_average_for_the_interval_and_test_each_client_for_mcnemar() -> None:
    rng = np.random.default_rng(8)
    clients = [rng.random(60) < 0.5 for _ in range(4)]
    one = rng.random(60) < 0.55
    standalone = _side("Standalone", *clients, clients=[0, 1, 2, 3])
    result = compare(_side("FedAvg", one), standalone)
    fraction = np.mean(np.asarray(clients, dtype=float), axis=0)
    assert result.delta == pytest.approx(100 * (one.mean() - np.mean([c.mean() for c in clients])))
    low, high = _scipy_interval(one - fraction)
    assert (result.ci_low, result.ci_high) == (100 * low, 100 * high)
    per_client = [stats.binomtest(int(np.sum(one & ~c)), int(np.sum(one ^ c)), 0.5).pvalue for c in clients]
    assert result.p == max(per_client)
    assert result.b == sum(int(np.sum(one & ~c)) for c in clients)
    assert result.c == sum(int(np.sum(c & ~one)) for c in clients)
    assert [(ca, cb) for ca, cb, _ in result.tests] == [(None, 0), (None, 1), (None, 2), (None, 3)]
    assert [t.p for _, _, t in result.tests] == per_client

    # Both sides per client: client k against client k.
    others = [rng.random(60) < 0.5 for _ in range(4)]
    both = compare(_side("FedMKT", *others, clients=[0, 1, 2, 3]), standalone)
    assert [(ca, cb) for ca, cb, _ in both.tests] == [(k, k) for k in range(4)]
    assert both.p == max(mcnemar(o, c).p for o, c in zip(others, clients, strict=True))
    with pytest.raises(PairingError, match="different clients"):
        compare(
            _side("FedMKT", *others[:2], clients=[0, 1]), _side("Standalone", *clients[:2], clients=[2, 3])
        )


def test_final_sets_prefer_the_clients_models_of_that_round() -> None:
    sets = [
        _qset([True], rnd=0),
        _qset([True], rnd=2, client=1),
        _qset([True], rnd=2, client=0),
        _qset([True], rnd=2, role="llm"),
    ]
    assert final_sets(sets, "slm", 2) == sets[1:3]
    assert final_sets(sets, "slm", 0) == sets[:1]
    assert final_sets(sets, "llm", 0) == []


# -- the report ------------------------------------------------------------------------------

N = 40
RNG = np.random.default_rng(2026)
# The final-round answers of each synthetic run (acc, acc_norm); Standalone has one per client.
ANSWERS: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {
    (method, role): [
        (RNG.random(N) < p, RNG.random(N) < p) for _ in range(4 if method == "standalone" else 1)
    ]
    for method, role, p in [
        ("zeroshot", "slm", 0.35),
        ("zeroshot", "llm", 0.40),
        ("standalone", "slm", 0.45),
        ("fedavg", "slm", 0.50),
        ("centralized", "llm", 0.60),
        ("fedcollm", "slm", 0.55),
        ("fedcollm", "llm", 0.55),
    ]
}


def _metric(rnd: int, role: str, metric: str, value: float) -> dict[str, Any]:
    return {"round": rnd, "role": role, "client": None, "metric": metric, "value": value}


def _write_run(folder: Path, method: str, *, records: bool = True) -> RunRef:
    """A run folder as a run writes it: metrics.jsonl and questions/, rounds 0 and (if trained) 2.

    Round 0's answers are all wrong, so a comparison that read round 0 would show it."""
    folder.mkdir(parents=True)
    final_round = 0 if method == "zeroshot" else 2
    metrics, sets = [], []
    for (m, role), models in ANSWERS.items():
        if m != method:
            continue
        for rnd in sorted({0, final_round}):
            if rnd == final_round:
                clients: list[int | None] = list(range(len(models))) if len(models) > 1 else [None]
                answers = models
            else:
                clients, answers = [None], [(np.zeros(N, bool), np.zeros(N, bool))]
            for client, (acc, acc_norm) in zip(clients, answers, strict=True):
                sets.append(_qset(acc, acc_norm, rnd=rnd, role=role, client=client, shuffle=rnd + len(sets)))
            for key, index in (("acc", 0), ("acc_norm", 1)):
                value = float(np.mean([a[index].mean() for a in answers]))
                metrics += [_metric(rnd, role, key, value), _metric(rnd, role, f"{key}_stderr", 0.05)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if records:
        write_question_sets(folder, sets)
    return RunRef("arc_easy", method, folder)


def _expected(method_a: str, method_b: str, role: str, index: int) -> dict[str, Any]:
    """Δ, interval, p, b, c computed here from ANSWERS with scipy (rows aligned: ids in order)."""
    a = np.asarray([x[index] for x in ANSWERS[(method_a, role)]], dtype=bool)
    b = np.asarray([x[index] for x in ANSWERS[(method_b, role)]], dtype=bool)
    d = a.astype(float).mean(axis=0) - b.astype(float).mean(axis=0)
    low, high = _scipy_interval(d)
    pairs = [(ra, rb) for ra in a for rb in b]
    counts = [(int(np.sum(ra & ~rb)), int(np.sum(rb & ~ra))) for ra, rb in pairs]
    p = max(stats.binomtest(x, x + y, 0.5).pvalue if x + y else 1.0 for x, y in counts)
    return {
        "delta": 100 * d.mean(),
        "low": 100 * low,
        "high": 100 * high,
        "p": p,
        "b": sum(x for x, _ in counts),
        "c": sum(y for _, y in counts),
        "models": max(len(a), len(b)),
    }


def _table_row(text: str, section: str, comparison: str) -> list[str]:
    body = text.split(f"## Paired comparisons: {section}")[1].split("\n## ")[0]
    (line,) = [line for line in body.splitlines() if line.startswith(f"| arc_easy | {comparison} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def _p_text(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


PAIRS = [
    ("slm", "client SLMs (Table 2)", "fedcollm", "fedavg", "FedCoLLM − FedAvg"),
    ("slm", "client SLMs (Table 2)", "fedcollm", "standalone", "FedCoLLM − Standalone"),
    ("slm", "client SLMs (Table 2)", "fedcollm", "zeroshot", "FedCoLLM − Zero-Shot"),
    ("slm", "client SLMs (Table 2)", "fedavg", "standalone", "FedAvg − Standalone"),
    ("llm", "server LLM (Table 1)", "fedcollm", "centralized", "FedCoLLM − Centralized"),
    ("llm", "server LLM (Table 1)", "fedcollm", "zeroshot", "FedCoLLM − Zero-Shot"),
]


def test_the_report_shows_every_paired_comparison_in_markdown_csv_and_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    methods = ["zeroshot", "standalone", "fedavg", "centralized", "fedcollm"]
    runs = [_write_run(tmp_path / "runs" / m, m) for m in methods]
    drawn: list[tuple[list[float], list[list[float]]]] = []
    errorbar = matplotlib.axes.Axes.errorbar

    def recording(self: matplotlib.axes.Axes, x: Any, y: Any, *args: Any, **kwargs: Any) -> Any:
        drawn.append((list(x), [list(e) for e in kwargs["xerr"]]))
        return errorbar(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", recording)
    text = write_report(runs, tmp_path / "out")
    out = tmp_path / "out"

    csv_rows = {
        role: {r["comparison"]: r for r in csv.DictReader((out / f"paired_{role}.csv").open())}
        for role in ("slm", "llm")
    }
    assert [list(rows) for rows in csv_rows.values()] == [
        [c for r, _, _, _, c in PAIRS if r == "slm"],
        [c for r, _, _, _, c in PAIRS if r == "llm"],
    ]
    for role, section, method_a, method_b, comparison in PAIRS:
        cells = _table_row(text, section, comparison)
        row = csv_rows[role][comparison]
        assert cells[2] == row["n"] == str(N)
        for key, index, first in (("acc", 0, 3), ("acc_norm", 1, 7)):
            want = _expected(method_a, method_b, role, index)
            assert cells[first] == f"{want['delta']:+.1f}"
            assert cells[first + 1] == f"[{want['low']:+.1f}, {want['high']:+.1f}]"
            p, bc = _p_text(want["p"]), f"{want['b']}/{want['c']}"
            if want["models"] > 1:  # Standalone: the largest per-client p, b/c summed over clients
                p, bc = f"{p} (largest of 4)", f"{bc} (4 clients)"
            assert (cells[first + 2], cells[first + 3]) == (p, bc)
            assert float(row[f"{key}_delta"]) == pytest.approx(want["delta"], abs=1e-9)
            assert float(row[f"{key}_ci_low"]) == pytest.approx(want["low"], abs=1e-9)
            assert float(row[f"{key}_ci_high"]) == pytest.approx(want["high"], abs=1e-9)
            assert float(row[f"{key}_mcnemar_p"]) == pytest.approx(want["p"], rel=1e-12)
            assert (int(row[f"{key}_b"]), int(row[f"{key}_c"])) == (want["b"], want["c"])
            if want["models"] > 1:  # each client's test: "A's client/B's client:b/c:p"
                tests = [entry.split(":") for entry in row[f"{key}_tests"].split(";")]
                assert [pair for pair, _, _ in tests] == ["-/0", "-/1", "-/2", "-/3"]
                assert max(float(p) for _, _, p in tests) == pytest.approx(want["p"], rel=1e-12)
            else:
                assert row[f"{key}_tests"] == ""
        assert (row["round_a"], row["round_b"]) == ("2", "0" if method_b == "zeroshot" else "2")
        assert (row["models_a"], row["models_b"]) == ("1", "4" if method_b == "standalone" else "1")

    # The plots: one per role, every comparison's Δ with its interval as error bars.
    for role in ("slm", "llm"):
        assert f"![paired_arc_easy_{role}](paired_arc_easy_{role}.png)" in text
        assert (out / f"paired_arc_easy_{role}.png").read_bytes()[:4] == b"\x89PNG"
    want_bars = [
        (role, index)
        for role in ("llm", "slm")  # the order write_report draws them in
        for index in (0, 1)
    ]
    assert len(drawn) == len(want_bars)
    for (role, index), (deltas, (below, above)) in zip(want_bars, drawn, strict=True):
        wants = [_expected(a, b, role, index) for r, _, a, b, _ in PAIRS if r == role]
        assert deltas == pytest.approx([w["delta"] for w in wants], abs=1e-9)
        assert below == pytest.approx([w["delta"] - w["low"] for w in wants], abs=1e-9)
        assert above == pytest.approx([w["high"] - w["delta"] for w in wants], abs=1e-9)

    # Sections sit after their tables, and the rebuilt report is the same, byte for byte.
    assert (
        text.index("## Table 1") < text.index("## Paired comparisons: server LLM") < text.index("## Table 2")
    )
    assert (
        text.index("## Table 2") < text.index("## Paired comparisons: client SLMs") < text.index("## Table 3")
    )
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert write_report(runs, out) == text
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


def test_pairs_without_runs_or_records_are_skipped_with_a_note(tmp_path: Path) -> None:
    runs = [
        _write_run(tmp_path / "zeroshot", "zeroshot"),
        _write_run(tmp_path / "fedcollm", "fedcollm", records=False),  # written before records existed
        _write_run(tmp_path / "fedavg", "fedavg"),
        _write_run(tmp_path / "standalone", "standalone"),
    ]
    text = write_report(runs, tmp_path / "out")
    llm = text.split("## Paired comparisons: server LLM")[1].split("\n## ")[0]
    slm = text.split("## Paired comparisons: client SLMs")[1].split("\n## ")[0]
    assert "_no paired comparisons_" in llm
    assert "- arc_easy · FedCoLLM − Centralized: skipped, no Centralized run" in llm
    no_records = f"{tmp_path / 'fedcollm'} has no per-question records of round 2"
    assert f"- arc_easy · FedCoLLM − Zero-Shot: skipped, {no_records}" in llm
    for other in ("FedAvg", "Standalone", "Zero-Shot"):
        assert f"- arc_easy · FedCoLLM − {other}: skipped, {no_records}" in slm
    assert [line.split("|")[2].strip() for line in slm.splitlines() if line.startswith("| arc_easy")] == [
        "FedAvg − Standalone"
    ]
    assert (tmp_path / "out" / "paired_llm.csv").read_text() == ""
    assert not (tmp_path / "out" / "paired_arc_easy_llm.png").exists()
    assert (tmp_path / "out" / "paired_arc_easy_slm.png").is_file()

    # A role a run never evaluated (Standalone has no LLM) is named in the note, too.
    rows, notes = report_module.paired_comparisons(runs, "llm", [("fedavg", "zeroshot")])
    assert rows == [] and notes == [
        "arc_easy · FedAvg − Zero-Shot: skipped, the FedAvg run has no LLM evaluation"
    ]


def test_the_report_refuses_runs_scored_on_other_questions(tmp_path: Path) -> None:
    fedavg = _write_run(tmp_path / "fedavg", "fedavg")
    standalone = _write_run(tmp_path / "standalone", "standalone")
    path = tmp_path / "standalone" / "questions" / "round-0002-slm-client-1.jsonl"
    path.write_text(path.read_text().replace('"q007"', '"other-007"'))
    with pytest.raises(
        PairingError, match=rf"Standalone run {re.escape(str(tmp_path / 'standalone'))} .*other questions"
    ):
        write_report([fedavg, standalone], tmp_path / "out")
    for client in (0, 2, 3):
        p = tmp_path / "standalone" / "questions" / f"round-0002-slm-client-{client}.jsonl"
        p.write_text(p.read_text().replace('"q007"', '"other-007"'))
    with pytest.raises(
        PairingError, match=rf"FedAvg run {re.escape(str(tmp_path / 'fedavg'))} .* and the Standalone run"
    ):
        write_report([fedavg, standalone], tmp_path / "out")


# -- seeds: the pooled test --------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_sign_flip_test_is_mcnemars_exact_test_on_one_seed(seed: int) -> None:
    """On one model per side and one seed, d is in {-1, 0, 1} and flipping signs is McNemar's
    coin: exact (enumerated) at 12 questions, within Monte-Carlo error at 300."""
    rng = np.random.default_rng(seed)
    for n, tolerance in ((12, 1e-12), (300, 0.02)):
        a, b = rng.random(n) < 0.6, rng.random(n) < 0.45
        want = mcnemar(a, b).p
        assert sign_flip_p(a.astype(float) - b.astype(float)) == pytest.approx(want, abs=tolerance)


def test_no_differences_give_p_one() -> None:
    assert sign_flip_p(np.zeros(50)) == 1.0


def test_pooling_one_seed_is_the_paired_comparison() -> None:
    rng = np.random.default_rng(5)
    a, b = _side("A", rng.random(200) < 0.6), _side("B", rng.random(200) < 0.5)
    pooled, paired = pool([(a, b)]), compare(a, b)
    assert (pooled.n, pooled.seeds) == (200, 1)
    assert (pooled.delta, pooled.ci_low, pooled.ci_high) == (paired.delta, paired.ci_low, paired.ci_high)
    assert np.isnan(pooled.delta_sd)


def test_a_seed_repeated_is_not_counted_as_new_evidence() -> None:
    """The question is the unit: pooling the same answers twice leaves Δ, interval and p as one
    seed gives them (counting seed × question pairs as independent would shrink p)."""
    rng = np.random.default_rng(6)
    a, b = _side("A", rng.random(150) < 0.6), _side("B", rng.random(150) < 0.5)
    once, twice = pool([(a, b)]), pool([(a, b), (a, b)])
    assert (twice.delta, twice.ci_low, twice.ci_high, twice.p) == (
        once.delta,
        once.ci_low,
        once.ci_high,
        once.p,
    )
    assert twice.delta_sd == 0.0


def test_pooling_averages_each_question_over_seeds() -> None:
    rng = np.random.default_rng(7)
    n = 120
    per_seed = [(rng.random(n) < 0.65, rng.random(n) < 0.5) for _ in range(3)]
    sides = [(_side(f"A{s}", a), _side(f"B{s}", b)) for s, (a, b) in enumerate(per_seed)]
    result = pool(sides)
    d = np.mean([a.astype(float) - b.astype(float) for a, b in per_seed], axis=0)
    deltas = [100 * (a.mean() - b.mean()) for a, b in per_seed]
    low, high = _scipy_interval(d)
    assert result.delta == pytest.approx(np.mean(deltas), abs=1e-9)
    assert result.delta_sd == pytest.approx(np.std(deltas, ddof=1), abs=1e-9)
    assert (result.ci_low, result.ci_high) == pytest.approx((100 * low, 100 * high), abs=1e-9)
    flips = stats.permutation_test(
        (d,), np.mean, permutation_type="samples", n_resamples=N_RESAMPLES, rng=np.random.default_rng(SEED)
    )
    assert result.p == pytest.approx(flips.pvalue, abs=1e-12)


def test_seeds_on_other_questions_are_not_pooled() -> None:
    a0, b0 = _side("A seed 0", [True] * 10), _side("B seed 0", [False] * 10)
    a1 = side("A seed 1", [_qset([True] * 10, ids=[f"x{i}" for i in range(10)])])
    b1 = side("B seed 1", [_qset([False] * 10, ids=[f"x{i}" for i in range(10)])])
    with pytest.raises(PairingError, match="A seed 1 was evaluated on other questions than A seed 0"):
        pool([(a0, b0), (a1, b1)])


def _write_seeded_run(folder: Path, method: str, seed: int, answers: np.ndarray) -> RunRef:
    """A trained run (rounds 0 and 2) of one SLM whose round-2 answers are `answers`."""
    folder.mkdir(parents=True)
    n = len(answers)
    sets = [_qset(np.zeros(n, bool), rnd=0), _qset(answers, rnd=2)]
    metrics = [
        _metric(rnd, "slm", key, value)
        for rnd, acc in ((0, 0.0), (2, float(answers.mean())))
        for key, value in (("acc", acc), ("acc_stderr", 0.05), ("acc_norm", acc), ("acc_norm_stderr", 0.05))
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    write_question_sets(folder, sets)
    return RunRef("arc_easy", method, folder, seed)


def test_the_report_gives_mean_and_sd_over_seeds_and_the_pooled_test(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    n, seeds = 80, (0, 1, 2)
    answers = {
        (m, s): rng.random(n) < (0.7 if m == "fedcollm" else 0.5)
        for m in ("fedcollm", "fedavg")
        for s in seeds
    }
    runs = [_write_seeded_run(tmp_path / f"{m}-{s}", m, s, a) for (m, s), a in answers.items()]
    out = tmp_path / "out"
    text = write_report(runs, out)

    table2 = text.split("## Table 2")[1].split("\n## ")[0]
    for method, label in (("fedcollm", "FedCoLLM"), ("fedavg", "FedAvg")):
        accs = [float(answers[(method, s)].mean()) for s in seeds]
        (line,) = [line for line in table2.splitlines() if line.startswith(f"| arc_easy | {label} |")]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[2] == "3"  # seeds
        assert cells[3] == f"{100 * np.mean(accs):.1f} ± {100 * np.std(accs, ddof=1):.1f}"

    # Per-seed rows carry their seed; the pooled row is pool() over the three seeds.
    section = text.split("## Paired comparisons: client SLMs")[1].split("\n## ")[0]
    assert [line.split("|")[2].strip() for line in section.splitlines() if "FedCoLLM − FedAvg" in line][
        :3
    ] == [
        "0",
        "1",
        "2",
    ]
    want = pool([(_side("a", answers[("fedcollm", s)]), _side("b", answers[("fedavg", s)])) for s in seeds])
    pooled = section.split("Pooled over seeds")[1]
    (line,) = [line for line in pooled.splitlines() if line.startswith("| arc_easy | FedCoLLM − FedAvg |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2:4] == ["3", str(n)]
    assert cells[4] == f"{want.delta:+.1f} ± {want.delta_sd:.1f}"
    assert cells[5] == f"[{want.ci_low:+.1f}, {want.ci_high:+.1f}]"
    assert cells[6] == ("≤ 2.0e-04" if want.p <= 2e-4 + 1e-12 else _p_text(want.p))  # the floor is a bound
    with (out / "pooled_slm.csv").open() as fh:
        (row,) = [r for r in csv.DictReader(fh) if r["comparison"] == "FedCoLLM − FedAvg"]
    assert row["seeds"] == "0 1 2" and float(row["acc_sign_flip_p"]) == pytest.approx(want.p, rel=1e-12)
    assert float(row["acc_delta_sd"]) == pytest.approx(want.delta_sd, abs=1e-9)


def test_a_sign_flip_p_at_the_permutation_floor_is_written_as_a_bound() -> None:
    """No random flip reaches a mean of all-positive differences: p is the floor 2/(9999 + 1),
    which scipy's own two-sided p also gives, and the tables write it as "≤ 2.0e-04"."""
    from fedcollm.experiment.paired import SIGN_FLIP_P_FLOOR, format_sign_flip_p

    d = np.ones(1000)
    scipy_p = stats.permutation_test(
        (d,), np.mean, permutation_type="samples", n_resamples=N_RESAMPLES, rng=np.random.default_rng(SEED)
    ).pvalue
    assert sign_flip_p(d) == pytest.approx(scipy_p) == pytest.approx(SIGN_FLIP_P_FLOOR) == pytest.approx(2e-4)
    assert format_sign_flip_p(sign_flip_p(d)) == "≤ 2.0e-04"
    assert format_sign_flip_p(3e-4) == "3.0e-04" and format_sign_flip_p(0.0421) == "0.042"
