"""Communication: adapters in float16 (half the bytes) against float32, and against Table 3.

Two short FedAvg runs of the embedded engine that differ only in `federation.transport_dtype`
(float32, float16): `configs/smoke.toml`'s SLM (SmolLM2-135M, LoRA r=8 on q/v), 2 clients,
2 rounds, 64 ARC-Easy training questions (32 per client, batch 8), SLM evaluated on 100
validation questions before and after. Bytes come from each run's `communication.json` (the
ledger counts the arrays as they travel). Reported:

- bytes per round per client, float16 / float32 (target: at most one half);
- |acc(float16) - acc(float32)| after the run, in units of the float32 run's standard error
  (target: within one), and how many questions get the same prediction;
- bytes per round per client (down + up) for float32, float16 and bfloat16 adapters, the full
  model sent as float32, and the FedCoLLM paper's Table 3 settings (their LoRA parameter
  counts, sent as float32), in `<out>/communication.md`.

    .venv/bin/python bench/bench_comm.py [--quick]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchlib import Row, quiet, run_as_script

ROOT = Path(__file__).resolve().parent.parent

PAPER_TABLE3 = (
    # (setting, SLM, transmitted parameters M, share of the SLM %), as quoted in the headers of
    # configs/paper/s1-s3.toml, whose LoRA settings reproduce them.
    ("S1", "GPT-2-Small", 0.29, 0.24),
    ("S2", "OPT-1.3B", 3.15, 0.24),
    ("S3", "Sheared-LLaMA-1.3B", 3.15, 0.23),
)
"""FedCoLLM paper, Table 3: the SLM adapter each client exchanges per message (parameters only;
bytes here assume float32)."""


def work(quick: bool, transport: str) -> list[str]:
    """The `--set` overrides of one run."""
    from fedcollm.config import ExperimentConfig

    sets = [
        "algorithm='fedavg'",
        "federation.rounds=2",
        "federation.num_clients=2",
        "task.train_limit=64",
        "task.aux_fraction=0.0",
        "eval.limit=100",
        "eval.every_round=false",
        "eval.models=['slm']",
        f"federation.transport_dtype='{transport}'",
    ]
    if "checkpoint" in ExperimentConfig.model_fields:
        sets.append("checkpoint.enabled=false")
    if quick:
        sets += ["task.train_limit=16", "eval.limit=4", "federation.rounds=1"]
    return sets


def short_run(out: Path, transport: str, quick: bool) -> dict[str, Any]:
    """One run; its communication record, final SLM accuracy and per-question predictions."""
    from fedcollm.config import load_config
    from fedcollm.engines import run_experiment

    config = load_config(ROOT / "configs" / "smoke.toml", work(quick, transport))
    folder = out / f"comm-{transport}"
    recorder = run_experiment(config, folder, overwrite=True)
    comm = json.loads((folder / "communication.json").read_text(encoding="utf-8"))
    last = max(m.round for m in recorder.metrics if m.metric == "acc")
    final = {
        m.metric: m.value
        for m in recorder.metrics
        if m.round == last and m.role == "slm" and m.client is None
    }
    per_client = [(r["down_bytes"] + r["up_bytes"]) / r["clients"] for r in comm["rounds"]]
    return {
        "transport": transport,
        "bytes_per_round_per_client": sum(per_client) / len(per_client),
        "adapter_params": comm["adapter_params"],
        "full_model_params": comm["full_model_params"],
        "acc": final["acc"],
        "acc_stderr": final["acc_stderr"],
        "n": int(final["n"]),
    }


def table(runs: dict[str, dict[str, Any]]) -> str:
    """Bytes per round per client: our adapter in three dtypes, the full model, the paper's settings."""
    ours = runs["float32"]
    adapter, full = ours["adapter_params"], ours["full_model_params"]
    mb = 1e6
    lines = [
        "| what | parameters per message | share of the model | MB per round per client (down + up) |",
        "| --- | --- | --- | --- |",
    ]
    share = 100 * adapter / full
    for label, nbytes in (("float32", 4), ("float16", 2), ("bfloat16", 2)):
        measured = runs.get(label, {}).get("bytes_per_round_per_client")
        value = measured if measured is not None else 2 * nbytes * adapter
        source = "measured" if measured is not None else "computed"
        lines.append(
            f"| SmolLM2-135M LoRA r=8 q/v, {label} ({source}) | {adapter / 1e6:.3f} M | {share:.3f}% | "
            f"{value / mb:.2f} |"
        )
    lines.append(f"| SmolLM2-135M full model, float32 | {full / 1e6:.1f} M | 100% | {8 * full / mb:.0f} |")
    for setting, slm, sent_m, percent in PAPER_TABLE3:
        full_m = sent_m / (percent / 100)  # as far as the paper's rounded share tells
        lines.append(
            f"| paper Table 3 {setting}: {slm} LoRA, float32 | {sent_m:.2f} M | {percent:.2f}% | "
            f"{2 * 4 * sent_m:.2f} |"
        )
        lines.append(
            f"| paper {setting}: {slm} full model, float32 | ≈ {full_m:.0f} M | 100% | ≈ {8 * full_m:.0f} |"
        )
    return "\n".join(lines) + "\n"


def run(out: Path, quick: bool = False) -> list[Row]:
    """Two short runs (float32, float16 transport); rows for bytes, accuracy and the Table 3 view."""
    quiet()
    out.mkdir(parents=True, exist_ok=True)
    runs = {t: short_run(out, t, quick) for t in ("float32", "float16")}
    (out / "communication.md").write_text(table(runs), encoding="utf-8")
    (out / "communication.json").write_text(json.dumps(runs, indent=2), encoding="utf-8")
    full, half = runs["float32"], runs["float16"]
    delta = abs(half["acc"] - full["acc"])
    adapter_mb = full["bytes_per_round_per_client"] / 1e6
    model_mb = 8 * full["full_model_params"] / 1e6
    return [
        Row(
            "adapter transport float16 / float32: bytes per round per client",
            half["bytes_per_round_per_client"] / full["bytes_per_round_per_client"],
            0.5,
            better="lower",
            detail=f"{adapter_mb:.2f} MB -> {half['bytes_per_round_per_client'] / 1e6:.2f} MB per round "
            f"per client (full model in float32: {model_mb:.0f} MB; paper S1 adapter: "
            f"{8 * PAPER_TABLE3[0][2]:.2f} MB in float32); table in communication.md",
        ),
        Row(
            "float16 vs float32 transport: |acc difference| after a run",
            delta / full["acc_stderr"] if full["acc_stderr"] else float("nan"),
            1.0,
            better="lower",
            unit="stderr",
            detail=f"FedAvg, 2 clients, SmolLM2-135M, ARC-Easy n={full['n']}: float32 {full['acc']:.3f} ± "
            f"{full['acc_stderr']:.3f}, float16 {half['acc']:.3f} ± {half['acc_stderr']:.3f}",
        ),
        Row(
            "float16 adapter / full float32 model: bytes per round per client",
            100 * half["bytes_per_round_per_client"] / (8 * full["full_model_params"]),
            None,
            unit="%",
            detail=f"adapter {full['adapter_params'] / 1e6:.3f} M of {full['full_model_params'] / 1e6:.1f} M "
            f"parameters ({100 * full['adapter_params'] / full['full_model_params']:.2f}%; "
            "paper: 0.23-0.24%)",
        ),
    ]


def main() -> None:
    out = run_as_script(run, __doc__)
    print((out / "communication.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
