"""Tables and plots of a comparison, in the layout of the FedCoLLM paper's Tables 1-3.

Reads only run folders (metrics.jsonl, communication.json, questions/), so a report can be
rebuilt from finished runs at any time. After Tables 1 and 2, the comparisons the paper's claims
rest on (`LLM_PAIRS`, `SLM_PAIRS`) question by question: difference, paired bootstrap interval
and exact McNemar test (`fedcollm.experiment.paired`; paired_llm.csv, paired_slm.csv,
paired_<task>_<role>.png). With several seeds (`compare --seeds`), Tables 1 and 2 give the mean
± standard deviation over seeds, and the paired sections add each pair pooled over the seeds
(pooled_llm.csv, pooled_slm.csv) below the per-seed rows.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedcollm.evaluation.records import QuestionSet, read_question_sets
from fedcollm.experiment.paired import (
    BOOTSTRAP_METHOD,
    N_RESAMPLES,
    SEED,
    PairedResult,
    PooledResult,
    Side,
    compare,
    final_sets,
    format_p,
    format_points,
    format_sign_flip_p,
    pool,
    side,
)

LLM_METHODS = ("zeroshot", "centralized", "fedcollm")
SLM_METHODS = ("zeroshot", "standalone", "fedavg", "fedcollm")
METHOD_LABELS = {
    "zeroshot": "Zero-Shot",
    "standalone": "Standalone",
    "fedavg": "FedAvg",
    "centralized": "Centralized",
    "fedcollm": "FedCoLLM",
    "fedmkt": "FedMKT",
    "crosslm": "CrossLM",
}


@dataclass(frozen=True)
class RunRef:
    """A finished run of one method on one task (with one seed)."""

    task: str
    method: str
    folder: Path
    seed: int = 0


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def accuracy_by_round(metrics: Sequence[dict[str, Any]], role: str, key: str = "acc") -> dict[int, float]:
    """The (client-mean) accuracy of a role after each evaluated round."""
    return {
        m["round"]: m["value"]
        for m in metrics
        if m["role"] == role and m["metric"] == key and m["client"] is None
    }


def final(metrics: Sequence[dict[str, Any]], role: str, key: str) -> tuple[float, float] | None:
    """(value, stderr) of `key` at the last evaluated round, or None if never evaluated."""
    values = accuracy_by_round(metrics, role, key)
    if not values:
        return None
    last = max(values)
    return values[last], accuracy_by_round(metrics, role, f"{key}_stderr").get(last, float("nan"))


def _cell(value: tuple[float, float] | None) -> str:
    return "–" if value is None else f"{100 * value[0]:.1f} ± {100 * value[1]:.1f}"


def _seeds_cell(values: Sequence[float]) -> str:
    """Mean ± standard deviation (ddof 1) over seeds, in points."""
    return f"{100 * float(np.mean(values)):.1f} ± {100 * float(np.std(values, ddof=1)):.1f}"


def several_seeds(runs: Sequence[RunRef]) -> bool:
    return len({r.seed for r in runs}) > 1


def accuracy_rows(runs: Sequence[RunRef], role: str, methods: Sequence[str]) -> list[dict[str, str]]:
    """One row per (task, method) with final acc and acc_norm of `role`: ± the standard error of
    the one run, or, where the method ran with several seeds, mean ± standard deviation over them
    (and a `seeds` column)."""
    rows = []
    with_seeds = several_seeds(runs)
    for task in dict.fromkeys(r.task for r in runs):
        for method in methods:
            finals = []
            for run in (r for r in runs if r.task == task and r.method == method):
                metrics = read_metrics(run.folder)
                if accuracy_by_round(metrics, role):
                    finals.append((final(metrics, role, "acc"), final(metrics, role, "acc_norm")))
            if not finals:
                continue
            row = {"task": task, "method": METHOD_LABELS.get(method, method)}
            if with_seeds:
                row["seeds"] = str(len(finals))
            for i, key in enumerate(("acc", "acc_norm")):
                values = [f[i] for f in finals]
                if len(values) == 1 or any(v is None for v in values):
                    row[key] = _cell(values[0])
                else:
                    row[key] = _seeds_cell([v[0] for v in values if v is not None])
            rows.append(row)
    return rows


def communication_rows(runs: Sequence[RunRef]) -> list[dict[str, str]]:
    """Table 3: parameters per message and their share of the full model, bytes per client per round.

    One row per (task, method); with several seeds a `seeds` column counts the runs, and a
    figure that differs between them (bytes, where clients dropped out) is given as min–max.
    """
    with_seeds = several_seeds(runs)
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    for run in runs:
        figures = _communication_figures(run.folder / "communication.json")
        if figures is not None:
            groups.setdefault((run.task, run.method), []).append(figures)
    rows = []
    for (task, method), per_seed in groups.items():
        row = {"task": task, "method": METHOD_LABELS.get(method, method)}
        if with_seeds:
            row["seeds"] = str(len(per_seed))
        for key in per_seed[0]:
            values = sorted({figures[key] for figures in per_seed}, key=float)
            row[key] = values[0] if len(values) == 1 else f"{values[0]}–{values[-1]}"
        rows.append(row)
    return rows


def _communication_figures(path: Path) -> dict[str, str] | None:
    """Table 3's figures of one run, formatted; None for a run that sent nothing (Zero-Shot)."""
    if not path.is_file():
        return None
    comm = json.loads(path.read_text(encoding="utf-8"))
    rounds = comm.get("rounds") or []
    if not rounds:
        return None
    per_client = [(r["down_bytes"] + r["up_bytes"]) / max(1, r["clients"]) for r in rounds]
    return {
        "full model (M)": f"{comm['table3']['full_model_params_M']:.1f}",
        "transmitted (M)": f"{comm['table3']['transmitted_params_M']:.3f}",
        "percent": f"{comm['table3']['param_percent']:.3f}",
        "MB per client per round": f"{sum(per_client) / len(per_client) / 1e6:.2f}",
    }


def markdown_table(rows: Sequence[dict[str, str]]) -> str:
    if not rows:
        return "_no runs_\n"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, str]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        if rows:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def plot_accuracy(runs: Sequence[RunRef], out: Path) -> list[Path]:
    """One PNG per (task, role): accuracy after each round, one line per method (with several
    seeds: the mean over seeds, error bars one standard deviation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task in dict.fromkeys(r.task for r in runs):
        for role in ("slm", "llm"):
            fig, ax = plt.subplots(figsize=(5, 3.5))
            drawn = 0
            for method in dict.fromkeys(r.method for r in runs if r.task == task):
                curves = [
                    curve
                    for run in runs
                    if run.task == task and run.method == method
                    if (curve := accuracy_by_round(read_metrics(run.folder), role))
                ]
                if not curves:
                    continue
                xs = sorted(set.intersection(*(set(c) for c in curves)))
                values = np.array([[100 * c[x] for x in xs] for c in curves])
                label = METHOD_LABELS.get(method, method)
                if len(curves) > 1:
                    sd = values.std(axis=0, ddof=1)
                    ax.errorbar(xs, values.mean(axis=0), yerr=sd, marker="o", capsize=3, label=label)
                else:
                    ax.plot(xs, values[0], marker="o", label=label)
                drawn += 1
            if drawn:
                ax.set_title(
                    f"{task} · {role.upper()}" + (" (mean ± sd over seeds)" if several_seeds(runs) else "")
                )
                ax.set_xlabel("round")
                ax.set_ylabel("accuracy (%)")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
                fig.tight_layout()
                path = out / f"accuracy_{task}_{role}.png"
                fig.savefig(path, dpi=120)
                written.append(path)
            plt.close(fig)
    return written


SLM_PAIRS = (
    ("fedcollm", "fedavg"),
    ("fedcollm", "standalone"),
    ("fedcollm", "zeroshot"),
    ("fedavg", "standalone"),
)
"""The SLM comparisons the FedCoLLM paper's claims rest on, (A, B) for A − B."""
LLM_PAIRS = (("fedcollm", "centralized"), ("fedcollm", "zeroshot"))
"""The LLM comparisons the FedCoLLM paper's claims rest on, (A, B) for A − B."""
_ROLE_TITLES = {"llm": "server LLM (Table 1)", "slm": "client SLMs (Table 2)"}


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


@dataclass(frozen=True)
class PairedRow:
    """One paired comparison A − B of a role on one task (and seed), at each run's last round."""

    task: str
    seed: int
    a: RunRef
    b: RunRef
    round_a: int
    round_b: int
    models_a: int
    """How many models side A has: 1, or its clients' SLMs (Standalone)."""
    models_b: int
    acc: PairedResult
    acc_norm: PairedResult

    @property
    def comparison(self) -> str:
        return f"{_label(self.a.method)} − {_label(self.b.method)}"


def _final_records(
    run: RunRef, role: str, cache: dict[Path, list[QuestionSet]]
) -> tuple[int, list[QuestionSet]] | str:
    """The last evaluated round of `role` in `run` and that round's records, or why there are none."""
    rounds = accuracy_by_round(read_metrics(run.folder), role)
    if not rounds:
        return f"the {_label(run.method)} run has no {role.upper()} evaluation"
    last = max(rounds)
    if run.folder not in cache:
        cache[run.folder] = read_question_sets(run.folder)
    sets = final_sets(cache[run.folder], role, last)
    if not sets:
        return (
            f"{run.folder} has no per-question records of round {last} (a run written before records existed)"
        )
    return last, sets


def _pair_sets(
    by_method: dict[str, RunRef],
    method_a: str,
    method_b: str,
    role: str,
    cache: dict[Path, list[QuestionSet]],
) -> tuple[tuple[RunRef, int, list[QuestionSet]], tuple[RunRef, int, list[QuestionSet]]] | str:
    """Both sides' runs, last rounds and records of one pair within one task and seed, or why the
    pair cannot be made."""
    missing = [_label(m) for m in (method_a, method_b) if m not in by_method]
    if missing:
        return f"skipped, no {' and no '.join(missing)} run"
    run_a, run_b = by_method[method_a], by_method[method_b]
    final_a, final_b = _final_records(run_a, role, cache), _final_records(run_b, role, cache)
    if isinstance(final_a, str) or isinstance(final_b, str):
        return "skipped, " + "; ".join(f for f in (final_a, final_b) if isinstance(f, str))
    return (run_a, *final_a), (run_b, *final_b)


def _sides(
    pair: tuple[tuple[RunRef, int, list[QuestionSet]], tuple[RunRef, int, list[QuestionSet]]], norm: bool
) -> tuple[Side, Side]:
    (run_a, round_a, sets_a), (run_b, round_b, sets_b) = pair
    return (
        side(f"the {_label(run_a.method)} run {run_a.folder} (round {round_a})", sets_a, norm),
        side(f"the {_label(run_b.method)} run {run_b.folder} (round {round_b})", sets_b, norm),
    )


def paired_comparisons(
    runs: Sequence[RunRef], role: str, pairs: Sequence[tuple[str, str]]
) -> tuple[list[PairedRow], list[str]]:
    """Each pair (A, B) of `pairs` on each task and seed of `runs`: A − B on `role` question by
    question (`fedcollm.experiment.paired`), and a note for each pair that cannot be made (a run
    missing, a role not evaluated, no per-question records). Runs of different seeds are not
    paired with each other (`pooled_comparisons` pools them)."""
    rows: list[PairedRow] = []
    notes: list[str] = []
    cache: dict[Path, list[QuestionSet]] = {}
    with_seeds = several_seeds(runs)
    for task in dict.fromkeys(r.task for r in runs):
        for seed in dict.fromkeys(r.seed for r in runs if r.task == task):
            by_method = {r.method: r for r in runs if r.task == task and r.seed == seed}
            for method_a, method_b in pairs:
                what = f"{task}" + (f" (seed {seed})" if with_seeds else "")
                what += f" · {_label(method_a)} − {_label(method_b)}"
                found = _pair_sets(by_method, method_a, method_b, role, cache)
                if isinstance(found, str):
                    notes.append(f"{what}: {found}")
                    continue
                (run_a, round_a, sets_a), (run_b, round_b, sets_b) = found
                acc, acc_norm = (compare(*_sides(found, norm)) for norm in (False, True))
                rows.append(
                    PairedRow(
                        task, seed, run_a, run_b, round_a, round_b, len(sets_a), len(sets_b), acc, acc_norm
                    )
                )
    return rows, notes


@dataclass(frozen=True)
class PooledRow:
    """One paired comparison A − B of a role on one task, pooled over the seeds both ran with."""

    task: str
    method_a: str
    method_b: str
    seeds: tuple[int, ...]
    acc: PooledResult
    acc_norm: PooledResult

    @property
    def comparison(self) -> str:
        return f"{_label(self.method_a)} − {_label(self.method_b)}"


def pooled_comparisons(
    runs: Sequence[RunRef], role: str, pairs: Sequence[tuple[str, str]]
) -> list[PooledRow]:
    """Each pair (A, B) on each task with runs of several seeds, pooled over the seeds at which
    both sides have records (`fedcollm.experiment.paired.pool`); [] with a single seed (the
    per-seed rows are then the whole story, and a pair missing somewhere is noted there)."""
    if not several_seeds(runs):
        return []
    rows: list[PooledRow] = []
    cache: dict[Path, list[QuestionSet]] = {}
    for task in dict.fromkeys(r.task for r in runs):
        seeds = list(dict.fromkeys(r.seed for r in runs if r.task == task))
        for method_a, method_b in pairs:
            found = {}
            for seed in seeds:
                by_method = {r.method: r for r in runs if r.task == task and r.seed == seed}
                pair = _pair_sets(by_method, method_a, method_b, role, cache)
                if not isinstance(pair, str):
                    found[seed] = pair
            if len(found) < 2:
                continue
            acc, acc_norm = (pool([_sides(pair, norm) for pair in found.values()]) for norm in (False, True))
            rows.append(PooledRow(task, method_a, method_b, tuple(found), acc, acc_norm))
    return rows


def paired_markdown_rows(rows: Sequence[PairedRow], with_seed: bool = False) -> list[dict[str, str]]:
    """The paired comparisons as table rows: Δ in points, its 95 % interval, McNemar p and b/c, for
    acc and acc_norm. A side of several client SLMs is marked: p is the largest per-client p
    ("largest of K"), b/c summed over the clients ("K clients")."""
    table = []
    for row in rows:
        models = max(row.models_a, row.models_b)
        cells = {"task": row.task, **({"seed": str(row.seed)} if with_seed else {})}
        cells |= {"comparison": row.comparison, "n": str(row.acc.n)}
        for key, result in (("acc", row.acc), ("acc_norm", row.acc_norm)):
            cells[f"Δ {key}"] = format_points(result.delta)
            cells[f"{key} 95 % CI"] = f"[{format_points(result.ci_low)}, {format_points(result.ci_high)}]"
            p, bc = format_p(result.p), f"{result.b}/{result.c}"
            if models > 1:
                p, bc = f"{p} (largest of {len(result.tests)})", f"{bc} ({models} clients)"
            cells[f"{key} McNemar p"] = p
            cells[f"{key} b/c"] = bc
        table.append(cells)
    return table


def _interval_cells(key: str, result: PairedResult | PooledResult) -> dict[str, str]:
    """Δ and its interval in points, every digit kept, as CSV cells named after `key`."""
    return {
        f"{key}_delta": repr(result.delta),
        f"{key}_ci_low": repr(result.ci_low),
        f"{key}_ci_high": repr(result.ci_high),
    }


def paired_csv_rows(rows: Sequence[PairedRow]) -> list[dict[str, str]]:
    """The paired comparisons with every digit: Δ and interval in points, p, b, c, and each
    McNemar test of a side of several models (`tests`: "A's client/B's client:b/c:p;...")."""
    table = []
    for row in rows:
        cells = {
            "task": row.task,
            "seed": str(row.seed),
            "comparison": row.comparison,
            "method_a": row.a.method,
            "method_b": row.b.method,
            "round_a": str(row.round_a),
            "round_b": str(row.round_b),
            "models_a": str(row.models_a),
            "models_b": str(row.models_b),
            "n": str(row.acc.n),
        }
        for key, result in (("acc", row.acc), ("acc_norm", row.acc_norm)):
            cells |= _interval_cells(key, result) | {
                f"{key}_mcnemar_p": repr(result.p),
                f"{key}_b": str(result.b),
                f"{key}_c": str(result.c),
                f"{key}_tests": ";".join(
                    f"{'-' if ca is None else ca}/{'-' if cb is None else cb}:{t.b}/{t.c}:{t.p!r}"
                    for ca, cb, t in result.tests
                )
                if len(result.tests) > 1
                else "",
            }
        table.append(cells)
    return table


def pooled_markdown_rows(rows: Sequence[PooledRow]) -> list[dict[str, str]]:
    """The pooled comparisons as table rows: Δ as mean ± sd over seeds, its 95 % interval and the
    sign-flip p, for acc and acc_norm."""
    table = []
    for row in rows:
        cells = {
            "task": row.task,
            "comparison": row.comparison,
            "seeds": str(len(row.seeds)),
            "n": str(row.acc.n),
        }
        for key, result in (("acc", row.acc), ("acc_norm", row.acc_norm)):
            cells[f"Δ {key} (mean ± sd)"] = f"{format_points(result.delta)} ± {result.delta_sd:.1f}"
            cells[f"{key} 95 % CI"] = f"[{format_points(result.ci_low)}, {format_points(result.ci_high)}]"
            cells[f"{key} p"] = format_sign_flip_p(result.p)
        table.append(cells)
    return table


def pooled_csv_rows(rows: Sequence[PooledRow]) -> list[dict[str, str]]:
    """The pooled comparisons with every digit."""
    table = []
    for row in rows:
        cells = {
            "task": row.task,
            "comparison": row.comparison,
            "method_a": row.method_a,
            "method_b": row.method_b,
            "seeds": " ".join(str(seed) for seed in row.seeds),
            "n": str(row.acc.n),
        }
        for key, result in (("acc", row.acc), ("acc_norm", row.acc_norm)):
            cells |= _interval_cells(key, result) | {
                f"{key}_delta_sd": repr(result.delta_sd),
                f"{key}_sign_flip_p": repr(result.p),
            }
        table.append(cells)
    return table


def plot_paired(
    rows: Sequence[PairedRow], role: str, out: Path, pooled: Sequence[PooledRow] = ()
) -> list[Path]:
    """One PNG per task (`paired_<task>_<role>.png`): each comparison's Δ acc and Δ acc_norm in
    points with its 95 % paired bootstrap interval as error bars (per seed, then pooled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_seeds = len({r.seed for r in rows}) > 1 or bool(pooled)
    entries: list[tuple[str, str, PairedResult | PooledResult, PairedResult | PooledResult]] = [
        (r.task, r.comparison + (f" (seed {r.seed})" if with_seeds else ""), r.acc, r.acc_norm) for r in rows
    ]
    entries += [(r.task, f"{r.comparison} (pooled)", r.acc, r.acc_norm) for r in pooled]
    written = []
    for task in dict.fromkeys(e[0] for e in entries):
        these = [e for e in entries if e[0] == task]
        fig, ax = plt.subplots(figsize=(6.5, 1.4 + 0.55 * len(these)))
        ys = list(range(len(these)))[::-1]
        for offset, norm, key, marker in ((0.12, False, "acc", "o"), (-0.12, True, "acc_norm", "s")):
            results = [e[3] if norm else e[2] for e in these]
            deltas = [res.delta for res in results]
            errors = [
                [res.delta - res.ci_low for res in results],
                [res.ci_high - res.delta for res in results],
            ]
            ax.errorbar(deltas, [y + offset for y in ys], xerr=errors, fmt=marker, capsize=3, label=key)
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_yticks(ys)
        ax.set_yticklabels([e[1] for e in these])
        ax.set_title(f"{task} · {role.upper()}: A − B, 95 % paired bootstrap CI", fontsize=10)
        ax.set_xlabel("difference in accuracy (points)")
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"paired_{task}_{role}.png"
        fig.savefig(path, dpi=120)
        written.append(path)
        plt.close(fig)
    return written


def paired_section(
    role: str, rows: Sequence[PairedRow], notes: Sequence[str], pooled: Sequence[PooledRow] = ()
) -> str:
    """The markdown of one role's paired comparisons: an explanation, the table, the notes, and
    with several seeds the comparisons pooled over them."""
    with_seeds = len({r.seed for r in rows}) > 1
    lines = [
        f"## Paired comparisons: {_ROLE_TITLES.get(role, role)}",
        "",
        "A − B in points on the same questions, each run at its last evaluated round; 95 % paired "
        f"bootstrap interval ({BOOTSTRAP_METHOD}, {N_RESAMPLES} resamples, seed {SEED}); exact "
        "McNemar p (two-sided binomial test on the discordant questions: b = A right and B wrong, "
        "c = the reverse). A side of several client SLMs (Standalone): Δ and interval of the "
        "clients' mean, p the largest of the per-client tests, b/c summed over the clients "
        "(docs/statistics.md).",
        "",
        markdown_table(paired_markdown_rows(rows, with_seeds)) if rows else "_no paired comparisons_\n",
    ]
    if notes:
        lines += [*[f"- {note}" for note in notes], ""]
    if pooled:
        lines += [
            f"Pooled over seeds: per question the mean over seeds of A − B; Δ its mean (± the "
            f"standard deviation of the per-seed Δ), the 95 % paired bootstrap interval over "
            f"questions, and a two-sided sign-flip permutation p ({N_RESAMPLES} resamples, seed "
            f"{SEED}; docs/statistics.md).",
            "",
            markdown_table(pooled_markdown_rows(pooled)),
        ]
    return "\n".join(lines)


def write_report(runs: Sequence[RunRef], out: Path) -> str:
    """Write table1/2/3 and the paired comparisons as markdown and CSV plus plots into `out`;
    return the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    table1 = accuracy_rows(runs, "llm", LLM_METHODS)
    table2 = accuracy_rows(runs, "slm", SLM_METHODS)
    table3 = communication_rows(runs)
    for name, rows in (("table1_llm", table1), ("table2_slm", table2), ("table3_communication", table3)):
        write_csv(rows, out / f"{name}.csv")
    paired = {
        role: paired_comparisons(runs, role, pairs)
        for role, pairs in (("llm", LLM_PAIRS), ("slm", SLM_PAIRS))
    }
    pooled = {
        role: pooled_comparisons(runs, role, pairs)
        for role, pairs in (("llm", LLM_PAIRS), ("slm", SLM_PAIRS))
    }
    for role, (compared, _) in paired.items():
        write_csv(paired_csv_rows(compared), out / f"paired_{role}.csv")
        if pooled[role]:
            write_csv(pooled_csv_rows(pooled[role]), out / f"pooled_{role}.csv")
    plots = plot_accuracy(runs, out)
    plots += [
        path
        for role, (compared, _) in paired.items()
        for path in plot_paired(compared, role, out, pooled[role])
    ]
    seeds_line = (
        [
            f"Several seeds ({', '.join(str(seed) for seed in dict.fromkeys(r.seed for r in runs))}): "
            "in Tables 1 and 2 a row run with several seeds gives the mean ± standard deviation over "
            "them (a row of one seed: ± its standard error).",
            "",
        ]
        if several_seeds(runs)
        else []
    )
    text = "\n".join(
        [
            "# Comparison",
            "",
            "Accuracy in % (± standard error) after the last round, zero-shot multiple choice.",
            "",
            *seeds_line,
            "## Table 1: server LLM",
            "",
            markdown_table(table1),
            paired_section("llm", *paired["llm"], pooled["llm"]),
            "## Table 2: client SLMs (mean over clients)",
            "",
            markdown_table(table2),
            paired_section("slm", *paired["slm"], pooled["slm"]),
            "## Table 3: communication",
            "",
            markdown_table(table3),
            "## Plots",
            "",
            *[f"![{p.stem}]({p.name})" for p in plots],
            "",
        ]
    )
    (out / "report.md").write_text(text, encoding="utf-8")
    return text
