"""What the benchmarks share: result rows, timing, quiet model loading and fixed-size batches.

Every benchmark module exposes `run(out: Path, quick: bool = False) -> list[Row]`, so
`bench/run_all.py` calls them one after another in one process and prints their rows side by
side; each module's `main()` runs it alone. `quick` shrinks every size to check that the code
works (seconds, not figures).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Better = Literal["higher", "lower"]


@dataclass
class Row:
    """One line of the results table: a measured figure against its target.

    `target` None marks an informational figure (no target). `better` says which side of the
    target meets it. `ok` False marks a side condition the figure depends on as broken (e.g. two
    evaluators that should agree did not): the row is then not met whatever the figure.
    """

    name: str
    measured: float
    target: float | None = None
    better: Better = "higher"
    unit: str = "x"
    detail: str = ""
    ok: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        """Whether the target is met (None: no target, or nothing measured)."""
        if self.target is None or not math.isfinite(self.measured):
            return None
        if not self.ok:
            return False
        return self.measured >= self.target if self.better == "higher" else self.measured <= self.target

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, with `met` spelled out."""
        return asdict(self) | {"met": self.met}


def failed_row(benchmark: str, error: BaseException) -> Row:
    """The row a benchmark that raised leaves in the table (so one failure does not hide the others)."""
    return Row(f"{benchmark}: FAILED", float("nan"), detail=f"{type(error).__name__}: {error}")


def format_value(value: float, unit: str) -> str:
    """A measured figure with its unit, compactly (x for ratios, % for shares)."""
    if not math.isfinite(value):
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "%":
        return f"{value:.3g}%"
    if unit == "":
        return f"{value:.3g}"
    return f"{value:.3g} {unit}"


def target_text(row: Row) -> str:
    """The target as shown in the table, e.g. '>= 2.00x' or '<= 10.0%'."""
    if row.target is None:
        return "-"
    return f"{'>=' if row.better == 'higher' else '<='} {format_value(row.target, row.unit)}"


def met_text(row: Row) -> str:
    """'yes', 'no' or '-' (no target or nothing measured)."""
    return {True: "yes", False: "no", None: "-"}[row.met]


def markdown_table(rows: list[Row]) -> str:
    """The rows as a markdown table: name, measured, target, met, detail."""
    lines = ["| benchmark | measured | target | met | detail |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        detail = row.detail.replace("|", "/").replace("\n", " ")
        lines.append(
            f"| {row.name} | {format_value(row.measured, row.unit)} | {target_text(row)} | "
            f"{met_text(row)} | {detail} |"
        )
    return "\n".join(lines) + "\n"


def text_table(rows: list[Row]) -> str:
    """The rows as a fixed-width table for the terminal (details left out)."""
    width = max([len(r.name) for r in rows] + [9])
    lines = [f"{'benchmark':<{width}}  {'measured':>12}  {'target':>12}  met"]
    for row in rows:
        lines.append(
            f"{row.name:<{width}}  {format_value(row.measured, row.unit):>12}  "
            f"{target_text(row):>12}  {met_text(row)}"
        )
    return "\n".join(lines)


def timed_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls of `fn` after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def quiet() -> None:
    """Silence transformers' progress bars and warnings, and tokenizers' fork warning."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; the platform's processor string elsewhere)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    """What the figures depend on: the CPU and the instruction sets torch uses on it (bf16 in
    hardware or not), torch version and threads, CPU count, load average now."""
    import torch

    capabilities = torch.cpu.get_capabilities()
    isa = [name for name in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16") if capabilities.get(name)]
    return {
        "cpu": cpu_model(),
        "cpu_isa": isa,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def fixed_length_examples(tokenizer: Any, count: int, length: int, answer_tokens: int) -> list[Any]:
    """`count` training sequences of exactly `length` real tokens, the last `answer_tokens` scored.

    Cut from consecutive ARC-Easy training questions with their answers (real text, so the
    tokenizer's ordinary ids), with no padding: every position computed is a real token, which
    keeps a FLOP count from tokens honest.
    """
    from fedcollm.data import load_questions, render
    from fedcollm.lm.encoding import Encoded

    ids: list[int] = []
    needed = count * length
    questions = load_questions("arc_easy", "train", limit=max(64, needed // 20))
    for q in questions:
        r = render("arc_easy", q)
        ids += tokenizer(r.context + r.continuations[r.gold] + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= needed:
            break
    if len(ids) < needed:
        raise ValueError(f"not enough text for {count} x {length} tokens")
    return [
        Encoded(tuple(int(t) for t in ids[i * length : (i + 1) * length]), length - answer_tokens)
        for i in range(count)
    ]


def run_as_script(run: Callable[[Path, bool], list[Row]], doc: str | None) -> Path:
    """A benchmark module's command line (`--quick`, `--out DIR`): run it, print its rows as a table.

    Returns the output folder, for scripts that print files their run wrote there.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that it runs")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    print(markdown_table(run(args.out, args.quick)))
    return args.out
