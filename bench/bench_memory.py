"""Peak memory against the number of clients: embedded engine vs Flower's simulation engine.

The same work for every K: `configs/smoke.toml` (FedCoLLM, SmolLM2-135M as both LLM and SLM)
cut to one round on 64 ARC-Easy training questions (16 for the server's auxiliary set, 48 split
over the K clients), local batch size 2 so every client's batches have the same shape whatever
its share, and 4 evaluation questions. Each run happens in a fresh Python process; its memory
is measured two ways:

- `ru_maxrss` of that process (the kernel's exact peak resident set, embedded engine only: the
  Flower run's clients live in other processes),
- the peak over time of the summed resident set (RSS) and proportional set (PSS: shared pages
  split between the processes sharing them) of the process and all its descendants — Ray's
  GCS, raylet and worker processes for Flower — polled every 0.25 s.

The embedded engine shares one loaded SLM between all clients and swaps adapters, so its peak
should not depend on K (target: at most 10% growth from K=1 to K=16). Flower's simulation runs
one ClientApp actor per CPU core (2 here), each with its own SLM.

    .venv/bin/python bench/bench_memory.py [--quick] [--clients 1,4,16] [--flower-clients 1,16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import Row, markdown_table

ROOT = Path(__file__).resolve().parent.parent
WORK = [
    "federation.rounds=1",
    "task.train_limit=64",
    "task.aux_fraction=0.25",
    "train.batch_size=2",
    "eval.limit=4",
    "eval.every_round=false",
]


def overrides(clients: int, quick: bool) -> list[str]:
    """The `--set` overrides of one run (checkpoints off where the config has them)."""
    from fedcollm.config import ExperimentConfig

    extra = ["checkpoint.enabled=false"] if "checkpoint" in ExperimentConfig.model_fields else []
    if quick:
        extra += ["task.train_limit=40", "eval.limit=2", "eval.models=['slm']"]
    return [*WORK, f"federation.num_clients={clients}", *extra]


def child(engine: str, clients: int, out: Path, quick: bool) -> None:
    """Run the experiment in this (fresh) process and print its peak RSS as one JSON line."""
    sys.path.insert(0, str(Path(__file__).parent))
    from benchlib import quiet

    quiet()
    from fedcollm.config import load_config
    from fedcollm.engines import run_experiment
    from fedcollm.engines.flower import FlowerOptions

    config = load_config(ROOT / "configs" / "smoke.toml", overrides(clients, quick))
    start = time.perf_counter()
    if engine == "embedded":
        run_experiment(config, out, overwrite=True)
    else:
        run_experiment(config, out, overwrite=True, engine="flower", flower=FlowerOptions(min_clients=1))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"ru_maxrss_mb": usage.ru_maxrss / 1024, "run_s": time.perf_counter() - start}))


def _tree_memory(proc: Any) -> tuple[float, float, int]:
    """Summed RSS and PSS (MB) of a process and its descendants, and how many there are."""
    import psutil

    rss = pss = 0.0
    procs = [proc]
    with contextlib.suppress(psutil.Error):
        procs += proc.children(recursive=True)
    counted = 0
    for p in procs:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss / 2**20
        pss += getattr(info, "pss", info.rss) / 2**20
        counted += 1
    return rss, pss, counted


def measure(engine: str, clients: int, work: Path, quick: bool) -> dict[str, Any]:
    """Run one experiment in a fresh process; poll its process tree; return its peaks."""
    import psutil

    out = work / f"{engine}-{clients}"
    command = [sys.executable, __file__, "--child", engine, "--clients", str(clients), "--work", str(out)]
    if quick:
        command.append("--quick")
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "FLWR_TELEMETRY_ENABLED": "0"}
    started = time.perf_counter()
    pipe = subprocess.PIPE
    with subprocess.Popen(command, stdout=pipe, stderr=pipe, text=True, env=env) as proc:
        handle = psutil.Process(proc.pid)
        peak_rss = peak_pss = 0.0
        most = 0
        while proc.poll() is None:
            rss, pss, count = _tree_memory(handle)
            peak_rss, peak_pss, most = max(peak_rss, rss), max(peak_pss, pss), max(most, count)
            time.sleep(0.25)
        stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} K={clients} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return result | {
        "engine": engine,
        "clients": clients,
        "tree_rss_mb": peak_rss,
        "tree_pss_mb": peak_pss,
        "processes": most,
        "wall_s": time.perf_counter() - started,
    }


def run(
    out: Path,
    quick: bool = False,
    embedded_clients: tuple[int, ...] = (1, 4, 16),
    flower_clients: tuple[int, ...] = (1, 16),
) -> list[Row]:
    """Rows: embedded growth from the fewest to the most clients (target <= 10%), Flower's growth,
    and Flower against embedded at the most clients both ran.

    Flower's simulation is measured at fewer K by default (each run starts Ray: about a minute).
    """
    if quick:
        embedded_clients, flower_clients = (1, 2), (1, 2)
    work = out / "memory"
    runs = [("embedded", k) for k in embedded_clients] + [("flower", k) for k in flower_clients]
    results = [measure(engine, k, work, quick) for engine, k in runs]
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    by = {(r["engine"], r["clients"]): r for r in results}
    rows = []
    if embedded_clients:
        lo, hi = min(embedded_clients), max(embedded_clients)
        peaks = ", ".join(f"K={k} {by['embedded', k]['ru_maxrss_mb']:.0f}" for k in embedded_clients)
        first, last = by["embedded", lo]["ru_maxrss_mb"], by["embedded", hi]["ru_maxrss_mb"]
        rows.append(
            Row(
                f"embedded engine: peak RSS growth K={lo}->{hi}",
                100 * (last - first) / first,
                10.0,
                better="lower",
                unit="%",
                detail=f"peak RSS MB (ru_maxrss): {peaks}",
            )
        )
    if flower_clients:
        lo, hi = min(flower_clients), max(flower_clients)
        sums = ", ".join(
            f"K={k} {by['flower', k]['tree_pss_mb']:.0f} ({by['flower', k]['processes']} processes)"
            for k in flower_clients
        )
        first, last = by["flower", lo]["tree_pss_mb"], by["flower", hi]["tree_pss_mb"]
        rows.append(
            Row(
                f"Flower simulation: peak memory growth K={lo}->{hi}",
                100 * (last - first) / first,
                None,
                better="lower",
                unit="%",
                detail=f"peak summed PSS MB over the process tree (Ray included): {sums}",
            )
        )
    both = sorted(set(embedded_clients) & set(flower_clients))
    if both:
        k = both[-1]
        flower, embedded = by["flower", k], by["embedded", k]
        rows.append(
            Row(
                f"Flower simulation / embedded: peak memory at K={k}",
                flower["tree_pss_mb"] / embedded["tree_pss_mb"],
                None,
                detail=f"summed PSS {flower['tree_pss_mb']:.0f} MB vs {embedded['tree_pss_mb']:.0f} MB "
                f"(summed RSS {flower['tree_rss_mb']:.0f} vs {embedded['tree_rss_mb']:.0f}); whole runs "
                f"{flower['wall_s']:.0f} s vs {embedded['wall_s']:.0f} s",
            )
        )
    return rows


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that it runs")
    parser.add_argument("--clients", default="1,4,16", help="K values of the embedded engine")
    parser.add_argument("--flower-clients", default="1,16", help="K values of Flower's simulation ('' none)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--child", choices=["embedded", "flower"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, int(args.clients), args.work, args.quick)
        return
    embedded = tuple(int(k) for k in args.clients.split(",") if k)
    flower = tuple(int(k) for k in args.flower_clients.split(",") if k)
    print(markdown_table(run(args.out, args.quick, embedded, flower)))


if __name__ == "__main__":
    main()
