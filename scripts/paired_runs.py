"""Paired comparison of finished runs scored on the same questions: each run's final model
against the first run's, in points, with the 95 % paired bootstrap interval and McNemar's p.

For runs that differ in one setting (privacy budgets, quantisation, a learning rate) rather than
in the method, which `fedcollm compare` pairs by itself. Reads only the run folders' records.

    .venv/bin/python scripts/paired_runs.py runs/dp-arc-inf runs/dp-arc-eps8 runs/dp-arc-eps1 [--role slm]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedcollm.evaluation.records import read_question_sets
from fedcollm.experiment.paired import compare, final_sets, format_p, format_points, side


def final(run: Path, role: str) -> tuple[int, list]:
    sets = read_question_sets(run)
    rounds = sorted({s.round for s in sets if s.role == role and s.set == "eval"})
    if not rounds:
        raise SystemExit(f"{run}: no per-question records of {role}")
    return rounds[-1], final_sets(sets, role, rounds[-1])


def epsilon(run: Path) -> str:
    spent = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    values = [m["value"] for m in spent if m["metric"] == "dp_epsilon"]
    return f"{values[-1]:.2f}" if values else "∞ (off)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--role", default="slm")
    args = parser.parse_args()
    _, base_sets = final(args.runs[0], args.role)
    base = side(str(args.runs[0]), base_sets)
    start = side("round 0", final_sets(read_question_sets(args.runs[0]), args.role, 0))
    print(
        f"| run | ε spent | {args.role} acc | vs {args.runs[0].name} [95 % CI] | McNemar p | vs round 0 | p |"
    )
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        _, sets = final(run, args.role)
        this = side(str(run), sets)
        against = compare(this, base)
        vs_start = compare(this, start)
        acc = 100 * float(this.fraction.mean())
        first = run == args.runs[0]
        low, high = format_points(against.ci_low), format_points(against.ci_high)
        versus = "—" if first else f"{format_points(against.delta)} [{low}, {high}]"
        p = "—" if first else format_p(against.p)
        print(
            f"| {run.name} | {epsilon(run)} | {acc:.1f} % | {versus} | {p} | "
            f"{format_points(vs_start.delta)} | {format_p(vs_start.p)} |"
        )


if __name__ == "__main__":
    main()
