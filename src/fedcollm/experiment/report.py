"""Tables and plots of a comparison, in the layout of the FedCoLLM paper's Tables 1-3.

Reads only run folders (metrics.jsonl, communication.json), so a report can be rebuilt from
finished runs at any time.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """A finished run of one method on one task."""

    task: str
    method: str
    folder: Path


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


def write_report(runs: Sequence[RunRef], out: Path) -> str:
    """Write table1/2/3 as markdown and CSV plus plots into `out`; return the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    table1 = accuracy_rows(runs, "llm", LLM_METHODS)
    table2 = accuracy_rows(runs, "slm", SLM_METHODS)
    table3 = communication_rows(runs)
    for name, rows in (("table1_llm", table1), ("table2_slm", table2), ("table3_communication", table3)):
        write_csv(rows, out / f"{name}.csv")
    plots = plot_accuracy(runs, out)
    text = "\n".join(
        [
            "# Comparison",
            "",
            "Accuracy in % (± standard error) after the last round, zero-shot multiple choice.",
            "",
            "## Table 1: server LLM",
            "",
            markdown_table(table1),
            "## Table 2: client SLMs (mean over clients)",
            "",
            markdown_table(table2),
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
