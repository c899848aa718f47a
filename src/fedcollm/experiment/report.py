"""Tables and plots of a comparison, in the layout of the FedCoLLM paper's Tables 1-3.

Reads only run folders (metrics.jsonl, communication.json, questions/), so a report can be
rebuilt from finished runs at any time. After Tables 1 and 2, the comparisons the paper's claims
rest on (`LLM_PAIRS`, `SLM_PAIRS`) question by question: difference, paired bootstrap interval
and exact McNemar test (`fedcollm.experiment.paired`; paired_llm.csv, paired_slm.csv,
paired_<task>_<role>.png).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcollm.evaluation.records import QuestionSet, read_question_sets
from fedcollm.experiment.paired import (
    BOOTSTRAP_METHOD,
    N_RESAMPLES,
    SEED,
    PairedResult,
    compare,
    final_sets,
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


def accuracy_rows(runs: Sequence[RunRef], role: str, methods: Sequence[str]) -> list[dict[str, str]]:
    """One row per (task, method) with final acc and acc_norm of `role`."""
    rows = []
    by_key = {(r.task, r.method): r for r in runs}
    for task in dict.fromkeys(r.task for r in runs):
        for method in methods:
            run = by_key.get((task, method))
            if run is None:
                continue
            metrics = read_metrics(run.folder)
            if not accuracy_by_round(metrics, role):
                continue
            rows.append(
                {
                    "task": task,
                    "method": METHOD_LABELS.get(method, method),
                    "acc": _cell(final(metrics, role, "acc")),
                    "acc_norm": _cell(final(metrics, role, "acc_norm")),
                }
            )
    return rows


def communication_rows(runs: Sequence[RunRef]) -> list[dict[str, str]]:
    """Table 3: parameters per message and their share of the full model, bytes per client per round."""
    rows = []
    for run in runs:
        path = run.folder / "communication.json"
        if not path.is_file():
            continue
        comm = json.loads(path.read_text(encoding="utf-8"))
        rounds = comm.get("rounds") or []
        if not rounds:
            continue
        per_client = [(r["down_bytes"] + r["up_bytes"]) / max(1, r["clients"]) for r in rounds]
        rows.append(
            {
                "task": run.task,
                "method": METHOD_LABELS.get(run.method, run.method),
                "full model (M)": f"{comm['table3']['full_model_params_M']:.1f}",
                "transmitted (M)": f"{comm['table3']['transmitted_params_M']:.3f}",
                "percent": f"{comm['table3']['param_percent']:.3f}",
                "MB per client per round": f"{sum(per_client) / len(per_client) / 1e6:.2f}",
            }
        )
    return rows


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
    """One PNG per (task, role): accuracy after each round, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task in dict.fromkeys(r.task for r in runs):
        for role in ("slm", "llm"):
            fig, ax = plt.subplots(figsize=(5, 3.5))
            drawn = 0
            for run in (r for r in runs if r.task == task):
                curve = accuracy_by_round(read_metrics(run.folder), role)
                if not curve:
                    continue
                xs = sorted(curve)
                ax.plot(
                    xs,
                    [100 * curve[x] for x in xs],
                    marker="o",
                    label=METHOD_LABELS.get(run.method, run.method),
                )
                drawn += 1
            if drawn:
                ax.set_title(f"{task} · {role.upper()}")
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


def paired_comparisons(
    runs: Sequence[RunRef], role: str, pairs: Sequence[tuple[str, str]]
) -> tuple[list[PairedRow], list[str]]:
    """Each pair (A, B) of `pairs` on each task and seed of `runs`: A − B on `role` question by
    question (`fedcollm.experiment.paired`), and a note for each pair that cannot be made (a run
    missing, a role not evaluated, no per-question records). Runs of different seeds are not
    paired with each other."""
    rows: list[PairedRow] = []
    notes: list[str] = []
    cache: dict[Path, list[QuestionSet]] = {}
    several_seeds = len({r.seed for r in runs}) > 1
    for task in dict.fromkeys(r.task for r in runs):
        for seed in dict.fromkeys(r.seed for r in runs if r.task == task):
            by_method = {r.method: r for r in runs if r.task == task and r.seed == seed}
            for method_a, method_b in pairs:
                what = f"{task}" + (f" (seed {seed})" if several_seeds else "")
                what += f" · {_label(method_a)} − {_label(method_b)}"
                missing = [_label(m) for m in (method_a, method_b) if m not in by_method]
                if missing:
                    notes.append(f"{what}: skipped, no {' and no '.join(missing)} run")
                    continue
                run_a, run_b = by_method[method_a], by_method[method_b]
                final_a, final_b = _final_records(run_a, role, cache), _final_records(run_b, role, cache)
                if isinstance(final_a, str) or isinstance(final_b, str):
                    why = "; ".join(f for f in (final_a, final_b) if isinstance(f, str))
                    notes.append(f"{what}: skipped, {why}")
                    continue
                (round_a, sets_a), (round_b, sets_b) = final_a, final_b
                name_a = f"the {_label(method_a)} run {run_a.folder} (round {round_a})"
                name_b = f"the {_label(method_b)} run {run_b.folder} (round {round_b})"
                acc, acc_norm = (
                    compare(side(name_a, sets_a, norm), side(name_b, sets_b, norm)) for norm in (False, True)
                )
                rows.append(
                    PairedRow(
                        task, seed, run_a, run_b, round_a, round_b, len(sets_a), len(sets_b), acc, acc_norm
                    )
                )
    return rows, notes


def _points(value: float) -> str:
    return f"{round(value, 1) + 0.0:+.1f}"  # + 0.0: no "-0.0" for a value that rounds to zero


def _p_value(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


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
            cells[f"Δ {key}"] = _points(result.delta)
            cells[f"{key} 95 % CI"] = f"[{_points(result.ci_low)}, {_points(result.ci_high)}]"
            p, bc = _p_value(result.p), f"{result.b}/{result.c}"
            if models > 1:
                p, bc = f"{p} (largest of {len(result.tests)})", f"{bc} ({models} clients)"
            cells[f"{key} McNemar p"] = p
            cells[f"{key} b/c"] = bc
        table.append(cells)
    return table


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
            cells |= {
                f"{key}_delta": repr(result.delta),
                f"{key}_ci_low": repr(result.ci_low),
                f"{key}_ci_high": repr(result.ci_high),
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


def plot_paired(rows: Sequence[PairedRow], role: str, out: Path) -> list[Path]:
    """One PNG per task (`paired_<task>_<role>.png`): each comparison's Δ acc and Δ acc_norm in
    points with its 95 % paired bootstrap interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    several_seeds = len({r.seed for r in rows}) > 1
    for task in dict.fromkeys(r.task for r in rows):
        these = [r for r in rows if r.task == task]
        fig, ax = plt.subplots(figsize=(6.5, 1.4 + 0.55 * len(these)))
        ys = list(range(len(these)))[::-1]
        for offset, key, marker in ((0.12, "acc", "o"), (-0.12, "acc_norm", "s")):
            results = [getattr(r, key) for r in these]
            deltas = [res.delta for res in results]
            errors = [
                [res.delta - res.ci_low for res in results],
                [res.ci_high - res.delta for res in results],
            ]
            ax.errorbar(deltas, [y + offset for y in ys], xerr=errors, fmt=marker, capsize=3, label=key)
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_yticks(ys)
        ax.set_yticklabels([r.comparison + (f" (seed {r.seed})" if several_seeds else "") for r in these])
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


def paired_section(role: str, rows: Sequence[PairedRow], notes: Sequence[str]) -> str:
    """The markdown of one role's paired comparisons: an explanation, the table, the notes."""
    several_seeds = len({r.seed for r in rows}) > 1
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
        markdown_table(paired_markdown_rows(rows, several_seeds)) if rows else "_no paired comparisons_\n",
    ]
    if notes:
        lines += [*[f"- {note}" for note in notes], ""]
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
    for role, (compared, _) in paired.items():
        write_csv(paired_csv_rows(compared), out / f"paired_{role}.csv")
    plots = plot_accuracy(runs, out)
    plots += [path for role, (compared, _) in paired.items() for path in plot_paired(compared, role, out)]
    text = "\n".join(
        [
            "# Comparison",
            "",
            "Accuracy in % (± standard error) after the last round, zero-shot multiple choice.",
            "",
            "## Table 1: server LLM",
            "",
            markdown_table(table1),
            paired_section("llm", *paired["llm"]),
            "## Table 2: client SLMs (mean over clients)",
            "",
            markdown_table(table2),
            paired_section("slm", *paired["slm"]),
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
