"""Paired comparisons of two models on the same questions: difference, bootstrap interval, McNemar.

Two runs of a comparison answer the same evaluation questions, so their accuracies are compared
question by question (`questions/*.jsonl`, `fedcollm.evaluation.records`), not as two independent
samples: a question both get right or both get wrong says nothing about which is better.

- **Pairing.** The two sides' records are matched by question id (sorted, so the order the files
  list them in does not matter); sets whose ids differ are refused (`PairingError`, naming both).
- **Difference.** Δ = acc(A) − acc(B) in points (× 100), `acc` from `QuestionRecord.correct`
  and `acc_norm` from `correct_norm`.
- **Interval.** A 95 % percentile bootstrap interval of the mean of the per-question difference
  vector d_i = correct_A(i) − correct_B(i): questions are resampled with both models' answers
  together (the paired bootstrap), `scipy.stats.bootstrap` with `N_RESAMPLES` = 9999 resamples
  drawn by `np.random.default_rng(SEED)`, SEED = 0, so a report rebuilt from the same runs shows
  the same interval. Percentile rather than BCa: the statistic is a mean, whose bootstrap
  distribution is centred on the estimate already, and BCa's bias correction misbehaves on the
  lattice-valued distribution of correctness differences (3 one-sided flips among 300 questions:
  BCa excludes 0 where the exact McNemar p is 0.25; the percentile interval does not). When d is
  constant (identical answers: all ties; or every question flipped the same way) the bootstrap
  distribution is a point mass and the interval is [Δ, Δ], given directly (scipy's BCa would
  return NaN and warn).
- **McNemar.** The exact test: b = questions A gets right and B wrong, c = the reverse; under
  the null each discordant question is a fair coin, p = `scipy.stats.binomtest(b, b + c, 0.5)`
  two-sided; p = 1 when there are no discordant questions.

**A side of several models** (Standalone's, FedMKT's and CrossLM's clients each keep their own
SLM): its per-question correctness is the fraction of its K models right, so Δ is the difference
of the mean-over-clients accuracy that Table 2 shows and the bootstrap resamples questions with
all K answers to a question together (which keeps their correlation). McNemar's test needs one
right/wrong per question and model, so each client's SLM is tested against the other side
separately (client by client when both sides have the same clients, against the other side's one
model otherwise); the reported p is the largest of those p-values and b, c are summed over the
clients. Largest, because "A differs from B for every client" is then significant at level α
exactly when each test is (an intersection–union test: valid at α with no multiplicity
correction). Pooling the K·n client × question pairs into one test would count each question K
times as though the clients' answers to it were independent — they share the question and the
base model — and give too small a p; the mean of K p-values is not a p-value of any test. The
question of the mean over clients is the interval's.

**Pooled over seeds** (`compare --seeds`): every seed's runs answer the same questions, so the
question stays the unit. Per question, d_i is the mean over the S seeds of that seed's
difference (each a fraction of a side's models right, as above); Δ is its mean (the mean over
seeds of the per-seed Δ), the interval the same paired bootstrap over questions (all S seeds'
answers to a question resampled together), and the p-value a sign-flip permutation test of mean
d (`scipy.stats.permutation_test`, `permutation_type="samples"` on the one vector d:
under the null that A and B are exchangeable on each question, swapping them flips the sign of
d_i; `N_RESAMPLES` random flips, generator seeded by `SEED`, so p ≥ `SIGN_FLIP_P_FLOOR`). For one
seed and one model per side this is McNemar's exact test up to Monte-Carlo error (the tests hold
it). Counting the S·n seed × question pairs as independent would treat a question's answers
under different seeds as separate evidence — they share the question — and give too small a p.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from fedcollm.errors import FedcollmError
from fedcollm.evaluation.records import GenerationSet, QuestionSet

CONFIDENCE = 0.95
"""Confidence level of the bootstrap interval."""
N_RESAMPLES = 9999
"""Bootstrap resamples (scipy's default)."""
SIGN_FLIP_P_FLOOR = 2 / (N_RESAMPLES + 1)
"""The smallest two-sided sign-flip p of `N_RESAMPLES` random flips: twice the smallest one-sided
p, 1/(N_RESAMPLES + 1). A p there means "no random flip reached the observed mean"."""
SEED = 0
"""Seed of the bootstrap's generator, `np.random.default_rng(SEED)`: the same runs, the same interval."""
BOOTSTRAP_METHOD = "percentile"
"""`scipy.stats.bootstrap`'s interval method (why not BCa: the module docstring)."""
_BATCH = 1000
"""Resamples computed at once (bounds memory at about _BATCH × questions floats)."""


class PairingError(FedcollmError, ValueError):
    """Two sides that cannot be compared question by question; the message names both."""


@dataclass(frozen=True, eq=False)
class Side:
    """One side of a comparison: which questions, and which of them each of its models got right
    (compared by identity: it holds an array)."""

    label: str
    """Who this is, for messages: a method and its run folder."""
    ids: tuple[str, ...]
    """Question ids, sorted."""
    clients: tuple[int | None, ...]
    """The models, one per row of `correct`: (None,) for one model, client ids for per-client SLMs."""
    correct: np.ndarray
    """bool, shape (len(clients), len(ids)): model r right on question ids[i] (acc or acc_norm)."""

    @property
    def fraction(self) -> np.ndarray:
        """Per question, the fraction of this side's models that got it right (float64)."""
        return np.asarray(self.correct, dtype=np.float64).mean(axis=0)


def side(label: str, sets: Sequence[QuestionSet], norm: bool = False) -> Side:
    """The right/wrong answers of `sets` (one model's set, or one set per client) by question id.

    `norm` selects `acc_norm` (`correct_norm`) instead of `acc` (`correct`). Every set must hold
    the same question ids, each once; one model's set has client None, per-client sets distinct
    client ids (rows in client order).
    """
    if not sets:
        raise PairingError(f"{label}: no per-question records to compare")
    clients = [s.client for s in sets]
    if len(sets) > 1 and (None in clients or len(set(clients)) != len(clients)):
        raise PairingError(
            f"{label}: expected one model's records or one set per client, got clients {clients}"
        )
    ids, order, rows = _by_id(
        label,
        sets,
        lambda q: [(x.id, x.correct_norm if norm else x.correct) for x in q.questions],
        "question",
    )
    return Side(label, ids, order, np.asarray(rows, dtype=bool))


def _by_id(
    label: str, sets: Sequence[Any], values_of: Callable[[Any], list[tuple[str, Any]]], noun: str
) -> tuple[tuple[str, ...], tuple[int | None, ...], list[list[Any]]]:
    """Each set's values (`values_of`: (id, value) pairs) in id order, the sets in client order;
    every set must hold the same ids, each once (`noun` names them in the errors)."""
    ordered = sorted(sets, key=lambda s: -1 if s.client is None else s.client)
    rows = []
    ids: tuple[str, ...] | None = None
    for one in ordered:
        pairs = values_of(one)
        values = dict(pairs)
        if len(values) != len(pairs):
            raise PairingError(f"{label}: {noun} ids repeat in {one.file_name}")
        these = tuple(sorted(values))
        if ids is None:
            ids = these
        elif these != ids:
            raise PairingError(f"{label}: {one.file_name} holds other {noun}s than {ordered[0].file_name}")
        rows.append([values[i] for i in these])
    assert ids is not None
    return ids, tuple(s.client for s in ordered), rows


@dataclass(frozen=True)
class McNemar:
    """The exact McNemar test of one model pair on the same questions."""

    b: int
    """Questions A gets right and B wrong."""
    c: int
    """Questions B gets right and A wrong."""
    p: float
    """Two-sided exact p-value: `binomtest(b, b + c, 0.5)`; 1 without discordant questions."""


def mcnemar(a: np.ndarray, b: np.ndarray) -> McNemar:
    """Exact McNemar test of two aligned right/wrong vectors (the same questions, in the same order)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"two aligned vectors expected, got shapes {a.shape} and {b.shape}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    p = 1.0 if only_a + only_b == 0 else float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return McNemar(only_a, only_b, p)


def bootstrap_interval(differences: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-question differences (their units).

    `N_RESAMPLES` resamples of the questions, generator `np.random.default_rng(SEED)`; a constant
    vector (all ties, or all flipped one way) has the point interval [mean, mean].
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"a non-empty vector of differences expected, got shape {d.shape}")
    if np.all(d == d[0]):
        return float(d[0]), float(d[0])
    result = stats.bootstrap(
        (d,),
        np.mean,
        n_resamples=N_RESAMPLES,
        batch=_BATCH,
        confidence_level=confidence,
        method=BOOTSTRAP_METHOD,
        rng=np.random.default_rng(SEED),
    )
    interval = result.confidence_interval
    return float(interval.low), float(interval.high)


@dataclass(frozen=True)
class PairedResult:
    """A − B on the same questions: difference and interval in points, McNemar's test."""

    n: int
    """Questions compared."""
    delta: float
    """acc(A) − acc(B) in points (the clients' mean for a side of several models)."""
    ci_low: float
    ci_high: float
    """The 95 % paired bootstrap interval of `delta`, in points."""
    b: int
    c: int
    """Discordant questions (A right, B wrong; the reverse), summed over the client pairs."""
    p: float
    """Exact McNemar p-value; the largest over the client pairs where a side has several models."""
    tests: tuple[tuple[int | None, int | None, McNemar], ...]
    """Each McNemar test: (A's client, B's client, result); one entry for two single models."""


def compare(a: Side, b: Side) -> PairedResult:
    """A against B question by question (module docstring: what is paired, interval, test)."""
    if a.ids != b.ids:
        only_a, only_b = sorted(set(a.ids) - set(b.ids)), sorted(set(b.ids) - set(a.ids))
        raise PairingError(
            f"{a.label} and {b.label} were evaluated on different questions ({len(a.ids)} and "
            f"{len(b.ids)}; only in the first: {only_a[:3]}, only in the second: {only_b[:3]})"
        )
    if len(a.clients) == 1 or len(b.clients) == 1:
        pairs = [(i, j) for i in range(len(a.clients)) for j in range(len(b.clients))]
    elif a.clients == b.clients:
        pairs = [(i, i) for i in range(len(a.clients))]
    else:
        raise PairingError(
            f"{a.label} (clients {list(a.clients)}) and {b.label} (clients {list(b.clients)}) "
            "have per-client models for different clients"
        )
    tests = tuple((a.clients[i], b.clients[j], mcnemar(a.correct[i], b.correct[j])) for i, j in pairs)
    differences = a.fraction - b.fraction
    low, high = bootstrap_interval(differences)
    return PairedResult(
        n=len(a.ids),
        delta=100 * float(np.mean(differences)),
        ci_low=100 * low,
        ci_high=100 * high,
        b=sum(t.b for _, _, t in tests),
        c=sum(t.c for _, _, t in tests),
        p=max(t.p for _, _, t in tests),
        tests=tests,
    )


def final_sets(sets: Sequence[QuestionSet], role: str, rnd: int, set_name: str = "eval") -> list[QuestionSet]:
    """The records of `role` on `set_name` at round `rnd`: the per-client sets if there are any
    (the models a client-mean accuracy averages), else the one model's set; [] if none."""
    found = [s for s in sets if s.role == role and s.round == rnd and s.set == set_name]
    per_client = [s for s in found if s.client is not None]
    return per_client or found


@dataclass(frozen=True)
class PooledResult:
    """A − B pooled over seeds on the same questions (module docstring, "Pooled over seeds")."""

    n: int
    """Questions compared (the same in every seed)."""
    seeds: int
    """Seeds pooled."""
    delta: float
    """Mean over seeds of acc(A) − acc(B), in points."""
    delta_sd: float
    """Standard deviation over seeds of the per-seed difference, in points (ddof 1)."""
    ci_low: float
    ci_high: float
    """95 % paired bootstrap interval of `delta` over questions, in points."""
    p: float
    """Two-sided sign-flip permutation p-value of the mean per-question difference."""


def sign_flip_p(differences: np.ndarray) -> float:
    """Two-sided sign-flip permutation p-value of the mean of per-question differences.

    `scipy.stats.permutation_test` on the one sample with `permutation_type="samples"` flips the
    sign of each difference at random (`N_RESAMPLES` times, `np.random.default_rng(SEED)`; exact
    when 2ⁿ ≤ N_RESAMPLES); all-zero differences give p = 1.
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"a non-empty vector of differences expected, got shape {d.shape}")
    if not np.any(d):
        return 1.0
    result = stats.permutation_test(
        (d,),
        np.mean,
        permutation_type="samples",
        n_resamples=N_RESAMPLES,
        batch=_BATCH,
        alternative="two-sided",
        rng=np.random.default_rng(SEED),
    )
    return float(min(1.0, result.pvalue))


def pool(pairs: Sequence[tuple[Side, Side]]) -> PooledResult:
    """A against B pooled over seeds: one (A, B) pair of sides per seed, all on the same questions."""
    if not pairs:
        raise PairingError("no seeds to pool")
    ids = pairs[0][0].ids
    for a, b in pairs:
        for one in (a, b):
            if one.ids != ids:
                raise PairingError(
                    f"{one.label} was evaluated on other questions than {pairs[0][0].label} "
                    f"({len(one.ids)} and {len(ids)}): seeds can be pooled only on the same questions"
                )
    per_seed = np.stack([a.fraction - b.fraction for a, b in pairs])
    d = per_seed.mean(axis=0)
    low, high = bootstrap_interval(d)
    deltas = 100 * per_seed.mean(axis=1)
    return PooledResult(
        n=len(ids),
        seeds=len(pairs),
        delta=100 * float(d.mean()),
        delta_sd=float(np.std(deltas, ddof=1)) if len(pairs) > 1 else float("nan"),
        ci_low=100 * low,
        ci_high=100 * high,
        p=sign_flip_p(d),
    )


def format_points(value: float) -> str:
    """A difference in points, signed, one decimal."""
    return f"{round(value, 1) + 0.0:+.1f}"  # + 0.0: no "-0.0" for a value that rounds to zero


def format_p(p: float) -> str:
    """A p-value: three decimals, or two significant digits below 0.001."""
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def format_sign_flip_p(p: float) -> str:
    """A sign-flip p as `format_p` writes it, "≤ 2.0e-04" at the permutation test's floor (a
    bound, not a value: no random flip reached the observed mean)."""
    return f"≤ {format_p(SIGN_FLIP_P_FLOOR)}" if p <= SIGN_FLIP_P_FLOOR * (1 + 1e-9) else format_p(p)


def before_after(
    sets: Sequence[QuestionSet], role: str, last: int
) -> tuple[PairedResult, PairedResult] | None:
    """`role` after round `last` against its round 0 on the same questions, (acc, acc_norm); None
    when either round has no records (a role not evaluated, or a run without records)."""
    before, after = final_sets(sets, role, 0), final_sets(sets, role, last)
    if not before or not after or last == 0:
        return None
    name_a, name_b = f"{role.upper()} after round {last}", f"{role.upper()} before training"
    acc, acc_norm = (compare(side(name_a, after, norm), side(name_b, before, norm)) for norm in (False, True))
    return acc, acc_norm


# ---------------------------------------------------------------------------------------------
# Generated answers: exact match is right/wrong (McNemar, as acc); token F1 and Rouge-L are
# graded in [0, 1] (the same paired bootstrap interval, and the sign-flip permutation test).

BINARY_GENERATION_METRICS = frozenset({"exact_match"})


def generation_side(label: str, sets: Sequence[GenerationSet], metric: str) -> Side:
    """One side's per-example scores of `metric` by example id (one model's set, or one per client)."""
    if not sets:
        raise PairingError(f"{label}: no per-example records to compare")
    ids, order, rows = _by_id(label, sets, lambda g: [(e.id, e.score(metric)) for e in g.examples], "example")
    values = np.asarray(rows, dtype=np.float64)
    if metric in BINARY_GENERATION_METRICS:
        values = values.astype(bool)
    return Side(label, ids, order, values)


@dataclass(frozen=True)
class GradedResult:
    """A − B of a graded score on the same examples: difference and interval in points, and the
    sign-flip permutation p of the mean per-example difference (`sign_flip_p`)."""

    n: int
    delta: float
    ci_low: float
    ci_high: float
    p: float


def compare_graded(a: Side, b: Side) -> GradedResult:
    """A against B on a score in [0, 1] (per example: a side's mean over its models)."""
    if a.ids != b.ids:
        raise PairingError(f"{a.label} and {b.label} were evaluated on different examples")
    differences = a.fraction - b.fraction
    low, high = bootstrap_interval(differences)
    return GradedResult(
        len(a.ids), 100 * float(np.mean(differences)), 100 * low, 100 * high, sign_flip_p(differences)
    )


def generation_before_after(
    sets: Sequence[GenerationSet], role: str, last: int
) -> dict[str, PairedResult | GradedResult] | None:
    """`role` after round `last` against its round 0 on the same examples, per metric: exact match
    with McNemar's test, token F1 and Rouge-L with the sign-flip test; None without both rounds."""

    def final(rnd: int) -> list[GenerationSet]:
        found = [s for s in sets if s.role == role and s.round == rnd and s.set == "eval"]
        return [s for s in found if s.client is not None] or found

    before, after = final(0), final(last)
    if not before or not after or last == 0:
        return None
    name_a, name_b = f"{role.upper()} after round {last}", f"{role.upper()} before training"
    out: dict[str, PairedResult | GradedResult] = {}
    for metric in ("exact_match", "f1", "rouge_l"):
        a, b = generation_side(name_a, after, metric), generation_side(name_b, before, metric)
        out[metric] = compare(a, b) if metric in BINARY_GENERATION_METRICS else compare_graded(a, b)
    return out
