"""Seconds per round: embedded vs Flower simulation vs Flower deployment, with and without SecAgg+.

Runs one experiment (by default `configs/default.toml`, the default models: Gemma-3-270M server,
SmolLM2-135M clients, cut to a CPU-sized slice) on every engine and prints a markdown table with
each engine's mean round as a multiple of the embedded engine's, measured in the same run.
A round is timed from its start to the start of the next round (the last one: to the final
evaluation), so the server's loading and the evaluation before training are excluded; what the
clients load (in deployment: in their workers, or in every ClientApp process without them) is in
the rounds. Deployment runs its SuperNodes as `fedcollm deploy` does: node workers
(`node_worker`) keep each client's SLM and data loaded, and each ClientApp is forked from a warm
executor (`clientapp_executor`). `deployment-flower-executor` keeps the workers but lets Flower's
SuperExec start every ClientApp as a fresh process; `deployment-no-worker` has neither (a fresh
process that loads the model stack, the data and the SLM for every message).

    .venv/bin/python bench/bench_engines.py \
        --engines embedded,deployment,deployment-flower-executor,deployment-no-worker
    .venv/bin/python bench/bench_engines.py                       # every variant
    .venv/bin/python bench/bench_engines.py --engines embedded,simulation --set task.train_limit=40
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchlib import environment
from fedcollm.config import load_config
from fedcollm.engines import run_experiment
from fedcollm.engines.flower import FlowerOptions
from fedcollm.engines.flower.deploy import LocalFederation
from fedcollm.protocol import Reporter

DEFAULT_SET = [
    "task.train_limit=100",  # 20 questions for the server, 20 per client
    "federation.rounds=2",
    "eval.limit=20",
    "eval.every_round=false",
]
VARIANTS = (
    "embedded",
    "simulation",
    "simulation-secagg",
    "deployment",
    "deployment-secagg",
    "deployment-flower-executor",
    "deployment-no-worker",
)


class TimingReporter(Reporter):
    def __init__(self) -> None:
        self.events: list[tuple[float, str]] = []

    def phase(self, description: str, total: int | None = None) -> None:
        self.events.append((time.time(), description))

    def message(self, text: str) -> None:
        self.events.append((time.time(), text))


def round_seconds(events: list[tuple[float, str]], end: float) -> list[float]:
    """Durations of rounds: from 'round r/R' to the next round's start or the final evaluation."""
    starts = [(t, text) for t, text in events if re.fullmatch(r"round \d+/\d+", text)]
    out = []
    for i, (start, _) in enumerate(starts):
        if i + 1 < len(starts):
            stop = starts[i + 1][0]
        else:
            later = [t for t, text in events if t > start and "evaluating" in text]
            stop = later[0] if later else end
        out.append(stop - start)
    return out


def parse_log(log: str) -> list[tuple[float, str]]:
    """Events from the ServerApp log lines 'HH:MM:SS.mmm text' (same day assumed)."""
    events = []
    for line in log.splitlines():
        match = re.match(r"(\d\d):(\d\d):(\d\d)\.(\d\d\d) (.*)", line.strip())
        if match:
            h, m, s, ms, text = match.groups()
            events.append((int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000, text))
    return events


def run_variant(variant: str, config_path: Path, overrides: list[str], work: Path) -> list[float]:
    config = load_config(config_path, overrides)
    out = work / variant
    shutil.rmtree(out, ignore_errors=True)
    if variant.startswith("deployment"):
        federation = LocalFederation(
            work / f"{variant}-federation",
            config.federation.num_clients,
            warm_clientapps=not variant.endswith(("flower-executor", "no-worker")),
        )
        with federation:
            import shlex

            run_id = federation.submit(
                {
                    "experiment": config_path.resolve(),
                    "set": shlex.join(overrides),
                    "out": out.resolve(),
                    "secagg": variant.endswith("secagg"),
                    "node-worker": not variant.endswith("no-worker"),
                }
            )
            federation.wait(run_id, timeout=4 * 3600)
            log = federation.run_log(run_id)
            (out / "serverapp.log").write_text(log, encoding="utf-8")
            events = parse_log(log)
        return round_seconds(events, events[-1][0] if events else 0.0)
    reporter = TimingReporter()
    engine = "local" if variant == "embedded" else "flower"
    options = FlowerOptions(secagg=variant.endswith("secagg"))
    run_experiment(config, out, overwrite=True, reporter=reporter, engine=engine, flower=options)
    (out / "events.log").write_text(
        "".join(
            f"{time.strftime('%H:%M:%S', time.localtime(t))}.{int(t * 1000) % 1000:03d} {text}\n"
            for t, text in reporter.events
        ),
        encoding="utf-8",
    )
    return round_seconds(reporter.events, time.time())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=Path("configs/default.toml"))
    parser.add_argument("--set", action="append", default=None, help="config override (repeatable)")
    parser.add_argument("--engines", default=",".join(VARIANTS))
    parser.add_argument("--work", type=Path, default=Path("bench/out/engines"))
    args = parser.parse_args()
    overrides = DEFAULT_SET + (args.set or [])
    config = load_config(args.config, overrides)
    print(json.dumps(environment()), file=sys.stderr)
    print(
        f"{config.name}: {config.algorithm}, server {config.llm.name if config.llm else '-'}, "
        f"{config.federation.num_clients} clients on {config.slm.name}, overrides {overrides}",
        file=sys.stderr,
    )
    results: dict[str, list[float]] = {}
    for variant in args.engines.split(","):
        started = time.time()
        results[variant] = run_variant(variant, args.config, overrides, args.work)
        print(
            f"{variant}: rounds {[round(s, 1) for s in results[variant]]} "
            f"(whole run {time.time() - started:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    base = statistics.mean(results["embedded"]) if "embedded" in results else None
    print("| engine | s/round (mean) | rounds | × embedded |")
    print("| --- | --- | --- | --- |")
    for variant, seconds in results.items():
        mean = statistics.mean(seconds)
        ratio = f"{mean / base:.2f}" if base else "-"
        print(f"| {variant} | {mean:.1f} | {', '.join(f'{s:.1f}' for s in seconds)} | {ratio} |")


if __name__ == "__main__":
    main()
