"""LoRA training step on SmolLM2-135M: compute efficiency, and bf16 against fp32.

Three measurements, side by side in one process:

1. **Matmul peak** of this machine per dtype: the best GFLOP/s of a large square `torch.matmul`
   (2·n³ FLOPs), float32 and bfloat16, with torch's default threads.
2. **Training step** of `fedcollm.training.sft.train_sft` (the clients' code path: forward to the
   answer logits, cross-entropy, backward, gradient clipping, AdamW) on a batch of B sequences of
   exactly L real tokens, for float32 weights, bfloat16 weights (float32 adapters and optimiser,
   `dtype = "bfloat16"`), and float32 weights under `torch.autocast(bfloat16)`. Per-step times
   come from `train_sft`'s step callback; the first step (warm-up) is dropped.
   Efficiency = FLOPs per step / median step time / matmul peak of the same dtype.
   When it is under target, and always for bfloat16, a torch.profiler table of two steps (top
   ops by self CPU time) is written to `<out>/profile_train_<dtype>.txt` and its top ops go
   into the row.
3. **Accuracy after a short run**: the same few SFT steps on ARC-Easy in float32 and bfloat16,
   then zero-shot accuracy on N validation questions; the difference in units of fp32's
   standard error (target: within one).

FLOPs of one step (`count_step_flops`), counted from the shapes of the matmuls the step runs
(forward hooks on every `nn.Linear`, so the LoRA modules and the LM head applied only at the
answer positions are included exactly) plus attention from the config:

    linear call x[rows, in] @ W[in, out]:  forward 2·rows·in·out
        backward: + 2·rows·in·out for the input gradient, only if x requires grad
                  + 2·rows·in·out for the weight gradient, only if W requires grad (LoRA only)
    attention (causal, per layer and sequence of length L, d = heads·head_dim):
        forward 2·d·L(L+1)  (QKᵀ and AV over the lower triangle), backward 2× forward

With LoRA the frozen base weights get no gradient, so the backward of the base model is about
one forward (input gradients only), not two: a step is ≈ 4·N·T (N = base parameters in
matmuls, T = tokens), not the 6·N·T of full fine-tuning. Recomputation inside the attention
kernel's backward is not counted (useful FLOPs only).

On a CPU without native bfloat16 (no AVX-512 BF16 or AMX) torch emulates bf16 at about 1 % of
float32's speed, so every bf16 measurement would take hours: they are skipped, and their rows say
so with the bf16 matmul rate of one small product as the reason.

    .venv/bin/python bench/bench_train.py [--quick]
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchlib import Row, environment, fixed_length_examples, median, quiet, run_as_script

MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Sizes:
    """Everything that sets the benchmark's cost."""

    batch: int = 8
    length: int = 128
    answer_tokens: int = 8
    steps: int = 5
    peak_sizes: tuple[int, ...] = (2048, 4096)
    peak_repeats: tuple[int, ...] = (8, 3)
    acc_train: int = 64
    acc_eval: int = 100

    @classmethod
    def quick(cls) -> Sizes:
        return cls(batch=2, length=32, answer_tokens=4, steps=2, peak_sizes=(512,), peak_repeats=(3,),
                   acc_train=8, acc_eval=8)  # fmt: skip


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...], repeats: tuple[int, ...]) -> float:
    """Best GFLOP/s of `a @ b` for square matrices of the given sizes (2·n³ FLOPs each)."""
    best = 0.0
    for n, reps in zip(sizes, repeats, strict=True):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.matmul(a, b)
        for _ in range(reps):
            start = time.perf_counter()
            torch.matmul(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


@dataclass
class FlopCount:
    """FLOPs of one training step by kind (see the module docstring for the rules)."""

    linear_forward: int = 0
    linear_input_grad: int = 0
    linear_weight_grad: int = 0
    attention: int = 0

    @property
    def total(self) -> int:
        return self.linear_forward + self.linear_input_grad + self.linear_weight_grad + self.attention


def count_step_flops(model: Any, batch: Any) -> FlopCount:
    """FLOPs of one forward+backward of `target_logits` + cross-entropy on `batch` (no timing).

    Runs the forward once with hooks on every `nn.Linear` (base projections, LoRA A/B, LM head)
    recording the shapes and which operands require grad, and adds attention from the config.
    """
    from fedcollm.lm.logits import target_logits

    count = FlopCount()
    handles = []

    def hook(module: torch.nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0]
        rows = x.numel() // module.in_features
        flops = 2 * rows * module.in_features * module.out_features
        count.linear_forward += flops
        if x.requires_grad:
            count.linear_input_grad += flops
        if module.weight.requires_grad:
            count.linear_weight_grad += flops

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(hook))
    model.train()
    try:
        target_logits(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    text = model.get_base_model().config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    d = text.num_attention_heads * head_dim
    lengths = batch.attention_mask.sum(dim=1).tolist()
    forward = sum(2 * d * n * (n + 1) for n in lengths) * text.num_hidden_layers
    count.attention = 3 * forward  # forward + backward (2x)
    return count


def step_times(lm: Any, examples: list[Any], batch: int, autocast: bool = False) -> list[float]:
    """Seconds of each `train_sft` step after the first (warm-up), from its step callback."""
    from fedcollm.config import TrainConfig

    pass
    from fedcollm.training.sft import train_sft

    stamps: list[float] = []
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    with context:
        train_sft(
            lm.model,
            examples,
            pad_id=lm.pad_id,
            lr=1e-4,
            cfg=TrainConfig(batch_size=batch),
            seed=0,
            on_step=lambda step, total, loss: stamps.append(time.perf_counter()),
        )
    return [b - a for a, b in itertools.pairwise(stamps)]


@contextmanager
def _profiled(path: Path) -> Iterator[list[str]]:
    """Profile the body with torch.profiler; write the top-ops table; yield a list to get the top 3."""
    from torch.profiler import ProfilerActivity, profile

    top: list[str] = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield top
    averages = prof.key_averages()
    path.write_text(averages.table(sort_by="self_cpu_time_total", row_limit=20), encoding="utf-8")
    total = sum(e.self_cpu_time_total for e in averages) or 1.0
    ranked = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:3]
    top += [f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in ranked]


def accuracy_after_short_run(sizes: Sizes, with_bf16: bool = True) -> dict[str, Any]:
    """Train the same few SFT steps in fp32 and bf16, evaluate both on the same questions."""
    from fedcollm.config import LoraConfig, TrainConfig
    from fedcollm.data import load_questions, render
    from fedcollm.evaluation.multiple_choice import evaluate
    from fedcollm.lm.models import Placement, load_with_lora

    pass
    from fedcollm.training.sft import train_sft

    train = [render("arc_easy", q) for q in load_questions("arc_easy", "train", limit=sizes.acc_train)]
    questions = load_questions("arc_easy", "validation", limit=sizes.acc_eval)
    requests = [render("arc_easy", q) for q in questions]
    out: dict[str, Any] = {"train_questions": len(train), "eval_questions": len(requests)}
    predictions = {}
    dtypes = [("float32", torch.float32)] + ([("bfloat16", torch.bfloat16)] if with_bf16 else [])
    for name, dtype in dtypes:
        lm = load_with_lora(MODEL, LoraConfig(), seed=1, where=Placement(dtype=dtype))
        start = time.perf_counter()
        examples = lm.encode_sft(train, 256)
        trained = train_sft(
            lm.model, examples, pad_id=lm.pad_id, lr=3e-4, cfg=TrainConfig(batch_size=8), seed=0
        )
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        result = evaluate(lm.model, lm.tokenizer, requests, add_bos=lm.add_bos, batch_size=16)
        out[name] = {
            "acc": result.acc,
            "acc_stderr": result.acc_stderr,
            "acc_norm": result.acc_norm,
            "train_loss": trained.mean_loss,
            "train_s": round(train_s, 2),
            "eval_s": round(time.perf_counter() - start, 2),
        }
        predictions[name] = result.predictions
        del lm
    if with_bf16:
        out["same_predictions"] = sum(a == b for a, b in zip(*predictions.values(), strict=True))
    return out


def run(out: Path, quick: bool = False) -> list[Row]:
    """All three measurements; writes `<out>/train.json` (and profiles when efficiency is missed)."""
    quiet()
    from fedcollm.config import LoraConfig
    from fedcollm.lm.encoding import collate
    from fedcollm.lm.models import Placement, load_with_lora
    from fedcollm.lm.precision import native_bfloat16

    sizes = Sizes.quick() if quick else Sizes()
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"model": MODEL, "sizes": sizes.__dict__, "environment": environment()}
    native = native_bfloat16()
    peaks = {
        "float32": matmul_peak(torch.float32, sizes.peak_sizes, sizes.peak_repeats),
        # emulated bf16 gets one small product: the peak sizes would take minutes
        "bfloat16": matmul_peak(
            torch.bfloat16, *((sizes.peak_sizes, sizes.peak_repeats) if native else ((256,), (2,)))
        ),
    }
    report["matmul_peak_gflops"] = peaks
    report["native_bfloat16"] = native
    if not native:
        return _float32_only(out, report, sizes, peaks)
    rows: list[Row] = []
    times: dict[str, float] = {}
    profiles: dict[str, str] = {}
    n_examples = sizes.batch * (sizes.steps + 1)
    for variant, dtype, autocast in (
        ("float32", torch.float32, False),
        ("bfloat16", torch.bfloat16, False),
        ("autocast", torch.float32, True),
    ):
        lm = load_with_lora(MODEL, LoraConfig(), seed=0, where=Placement(dtype=dtype))
        examples = fixed_length_examples(lm.tokenizer, n_examples, sizes.length, sizes.answer_tokens)
        seconds = step_times(lm, examples, sizes.batch, autocast=autocast)
        times[variant] = median(seconds)
        report[f"step_s_{variant}"] = seconds
        if variant == "autocast":
            continue
        flops = count_step_flops(lm.model, collate(examples[: sizes.batch], 0, device="cpu"))
        achieved = flops.total / times[variant] / 1e9
        efficiency = 100 * achieved / peaks[variant]
        report[f"flops_{variant}"] = flops.__dict__ | {"total": flops.total}
        detail = (
            f"{flops.total / 1e9:.0f} GFLOP/step ({sizes.batch}x{sizes.length} tokens) in "
            f"{times[variant]:.2f} s = {achieved:.0f} GFLOP/s; {variant} matmul peak "
            f"{peaks[variant]:.0f} GFLOP/s"
        )
        # bf16 is always profiled: its speed-up target is about where its step spends time.
        if efficiency < 50 or variant == "bfloat16":
            profile_path = out / f"profile_train_{variant}.txt"
            with _profiled(profile_path) as top:
                step_times(lm, examples[: 2 * sizes.batch], sizes.batch)
            profiles[variant] = f"top ops by self CPU {', '.join(top)} ({profile_path.name})"
            if efficiency < 50:
                detail += f"; missed: {profiles[variant]}"
        rows.append(Row(f"LoRA step FLOP efficiency, {variant}", efficiency, 50.0, unit="%", detail=detail))
        del lm
    rows.append(
        Row(
            "bf16 weights vs fp32: training step speed-up",
            times["float32"] / times["bfloat16"],
            2.0,
            detail=f"fp32 {times['float32']:.2f} s, bf16 weights {times['bfloat16']:.2f} s per step "
            f"(median of {sizes.steps}); bf16 step: {profiles['bfloat16']}",
        )
    )
    rows.append(
        Row(
            "autocast bf16 vs fp32: training step speed-up",
            times["float32"] / times["autocast"],
            None,
            detail=f"fp32 weights under torch.autocast(bfloat16): {times['autocast']:.2f} s per step",
        )
    )
    accuracy = accuracy_after_short_run(sizes)
    report["accuracy"] = accuracy
    fp32, bf16 = accuracy["float32"], accuracy["bfloat16"]
    delta = abs(bf16["acc"] - fp32["acc"])
    rows.append(
        Row(
            "bf16 vs fp32: |acc difference| after a short run",
            delta / fp32["acc_stderr"] if fp32["acc_stderr"] else float("nan"),
            1.0,
            better="lower",
            unit="stderr",
            detail=f"ARC-Easy, {accuracy['train_questions']} training questions, "
            f"n={accuracy['eval_questions']}: fp32 {fp32['acc']:.3f} ± {fp32['acc_stderr']:.3f}, "
            f"bf16 {bf16['acc']:.3f} ± {bf16['acc_stderr']:.3f}; same prediction on "
            f"{accuracy['same_predictions']}/{accuracy['eval_questions']}",
        )
    )
    rows.append(
        Row(
            "bf16 vs fp32: evaluation speed-up",
            fp32["eval_s"] / bf16["eval_s"],
            None,
            detail=f"the evaluation above: fp32 {fp32['eval_s']:.1f} s, bf16 {bf16['eval_s']:.1f} s",
        )
    )
    (out / "train.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return rows


BF16_ROWS = (
    ("LoRA step FLOP efficiency, bfloat16", 50.0, "%"),
    ("bf16 weights vs fp32: training step speed-up", 2.0, "x"),
    ("autocast bf16 vs fp32: training step speed-up", None, "x"),
    ("bf16 vs fp32: |acc difference| after a short run", 1.0, "stderr"),
    ("bf16 vs fp32: evaluation speed-up", None, "x"),
)


def _float32_only(out: Path, report: dict[str, Any], sizes: Sizes, peaks: dict[str, float]) -> list[Row]:
    """The float32 measurements, and each bf16 row marked skipped with the reason."""
    from fedcollm.config import LoraConfig
    from fedcollm.lm.encoding import collate
    from fedcollm.lm.models import Placement, load_with_lora

    lm = load_with_lora(MODEL, LoraConfig(), seed=0, where=Placement(dtype=torch.float32))
    examples = fixed_length_examples(
        lm.tokenizer, sizes.batch * (sizes.steps + 1), sizes.length, sizes.answer_tokens
    )
    seconds = step_times(lm, examples, sizes.batch)
    report["step_s_float32"] = seconds
    flops = count_step_flops(lm.model, collate(examples[: sizes.batch], 0, device="cpu"))
    achieved = flops.total / median(seconds) / 1e9
    rows = [
        Row(
            "LoRA step FLOP efficiency, float32",
            100 * achieved / peaks["float32"],
            50.0,
            unit="%",
            detail=f"{flops.total / 1e9:.0f} GFLOP/step in {median(seconds):.2f} s = {achieved:.0f} GFLOP/s; "
            f"float32 matmul peak {peaks['float32']:.0f} GFLOP/s",
        )
    ]
    del lm
    accuracy = accuracy_after_short_run(sizes, with_bf16=False)
    report["accuracy"] = accuracy
    reason = (
        f"skipped: no native bfloat16 on this CPU (no AVX-512 BF16 or AMX); bf16 matmul "
        f"{peaks['bfloat16']:.1f} GFLOP/s against float32 {peaks['float32']:.0f} GFLOP/s"
    )
    rows += [Row(name, float("nan"), target, unit=unit, detail=reason) for name, target, unit in BF16_ROWS]
    (out / "train.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return rows


def main() -> None:
    run_as_script(run, __doc__)


if __name__ == "__main__":
    main()
