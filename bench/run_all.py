"""The whole benchmark suite in one run (`make bench`): one table of ratios against their targets.

Runs each benchmark's `run(out, quick)` in this process, one after another, so every figure
comes from the same machine state and the same run (the memory benchmark starts a fresh
process per measurement itself). A benchmark that fails leaves a FAILED row and the others
still run. Prints the table and writes it to `bench/out/`:

- `results.json`: environment (torch, threads, load average before and after), seconds per
  benchmark, every row (name, measured, target, met, detail);
- `results.md`: the same as a markdown table, ready for `bench/README.md`;
- each benchmark's own files (`train.json`, profiles of missed targets, `memory.json`,
  `communication.md`, ...).

Sized to finish within 20 minutes on the 2-core machine this was written on, when idle.

    .venv/bin/python bench/run_all.py                 # the suite
    .venv/bin/python bench/run_all.py --quick         # tiny sizes: check that everything runs
    .venv/bin/python bench/run_all.py --only train,eval
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import Row, environment, failed_row, markdown_table, text_table

Benchmark = Callable[[Path, bool], list[Row]]


def benchmarks() -> dict[str, Benchmark]:
    """Name -> run function, in the order the suite runs them (imported lazily: no side effects)."""
    import bench_comm
    import bench_distill
    import bench_eval_throughput
    import bench_load
    import bench_memory
    import bench_train

    return {
        "train": bench_train.run,
        "distill": bench_distill.run,
        "eval": bench_eval_throughput.run,
        "comm": bench_comm.run,
        "memory": bench_memory.run,
        "load": bench_load.run,
    }


def run_suite(out: Path, quick: bool, only: list[str] | None = None) -> dict[str, object]:
    """Run the selected benchmarks; return the report (also written to `out`)."""
    out.mkdir(parents=True, exist_ok=True)
    suite = benchmarks()
    names = only or list(suite)
    unknown = sorted(set(names) - set(suite))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; available: {', '.join(suite)}")
    before = environment()
    rows: list[Row] = []
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            rows += suite[name](out, quick)
        except Exception as exc:  # one failure must not hide the other figures
            (out / f"{name}.error.txt").write_text(traceback.format_exc(), encoding="utf-8")
            rows.append(failed_row(name, exc))
        seconds[name] = round(time.perf_counter() - start, 1)
        print(f"[bench] {name}: {seconds[name]:.0f} s", file=sys.stderr, flush=True)
        gc.collect()
    report: dict[str, object] = {
        "command": " ".join(sys.argv),
        "quick": quick,
        "environment_before": before,
        "environment_after": environment(),
        "seconds": seconds,
        "total_seconds": round(time.perf_counter() - started, 1),
        "rows": [row.as_dict() for row in rows],
    }
    (out / "results.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "results.md").write_text(results_markdown(report, rows), encoding="utf-8")
    print(text_table(rows))
    print(f"\ntotal {report['total_seconds']:.0f} s; written to {out}/results.md and results.json")
    return report


def results_markdown(report: dict[str, object], rows: list[Row]) -> str:
    """The report as markdown: when, on what, how long, and the table."""
    before, after = report["environment_before"], report["environment_after"]
    assert isinstance(before, dict) and isinstance(after, dict)
    seconds = report["seconds"]
    assert isinstance(seconds, dict)
    lines = [
        f"Run {before['date']}: `{report['command']}`{' (quick sizes)' if report['quick'] else ''}",
        "",
        f"torch {before['torch']}, {before['torch_threads']} threads, {before['cpus']} CPUs; load average "
        f"{before['load_average']} before, {after['load_average']} after; "
        f"{report['total_seconds']:.0f} s in total ("
        + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
        + ").",
        "",
        markdown_table(rows),
    ]
    return "\n".join(lines)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that everything runs")
    parser.add_argument("--only", default="", help="comma-separated subset: train,distill,eval,comm,memory")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()
    only = [name for name in args.only.split(",") if name] or None
    run_suite(args.out, args.quick, only)


if __name__ == "__main__":
    main()
