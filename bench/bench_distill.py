"""Server distillation step: one forward per model per batch (ours) vs the naive four.

The naive step runs, for each direction, a no-grad teacher forward and a student forward:
four forwards per batch. Ours (`fedcollm.distill.mutual_distill`) runs each model once; its
logits are its student output and, detached, the other model's teacher. Both give the same
losses; this times seconds per step of each, side by side in one run (first step of each
dropped as warm-up), and their ratio.

Both ways run the same two backwards, so the ratio cannot exceed about (2F + B) / (F + B), F
and B the time of one forward and one backward of both models on a batch (the naive teacher
forwards run without grad, so a bit less). With LoRA, B is about F (input gradients only),
which caps the ratio near 1.5. The row's detail gives that bound from F and B timed on the
same batch, so a ratio under the target can be told apart from a slow implementation.

    .venv/bin/python bench/bench_distill.py [--slm smollm2-135m] [--llm smollm2-135m] [--steps 4]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import Any

import torch

from benchlib import Row, median, quiet
from fedcollm.distill import kd_loss
from fedcollm.forward import answer_cross_entropy, target_logits


def naive_step(llm, slm, batch_f, batch_g, opt_f, opt_g, kd_weight: float, temperature: float) -> float:
    """Textbook two-way distillation: teacher and student forwards run separately per direction."""
    with torch.no_grad():
        teacher_g = target_logits(slm, batch_g)
    f_logits = target_logits(llm, batch_f)
    loss_f = answer_cross_entropy(f_logits, batch_f) + kd_weight * kd_loss(f_logits, teacher_g, temperature)
    loss_f.backward()
    with torch.no_grad():
        teacher_f = target_logits(llm, batch_f)
    g_logits = target_logits(slm, batch_g)
    loss_g = answer_cross_entropy(g_logits, batch_g) + kd_weight * kd_loss(g_logits, teacher_f, temperature)
    loss_g.backward()
    for opt in (opt_f, opt_g):
        opt.step()
        opt.zero_grad(set_to_none=True)
    return float(loss_f.detach() + loss_g.detach())


def forward_backward_seconds(model: Any, batch: Any, repeats: int = 2) -> tuple[float, float]:
    """Median seconds of one grad-enabled forward (to the answer logits) and of its backward."""
    forwards, backwards = [], []
    model.train()
    for _ in range(repeats + 1):
        start = time.perf_counter()
        loss = answer_cross_entropy(target_logits(model, batch), batch)
        middle = time.perf_counter()
        loss.backward()
        forwards.append(middle - start)
        backwards.append(time.perf_counter() - middle)
        model.zero_grad(set_to_none=True)
    return median(forwards[1:]), median(backwards[1:])


def measure(slm_name: str, llm_name: str, steps: int, batch_size: int) -> dict[str, Any]:
    """Seconds per step of ours and the naive step on the same CommonsenseQA batches."""
    from fedcollm.config import DistillConfig, LoraConfig, TrainConfig
    from fedcollm.data import load_questions, render
    from fedcollm.distill import mutual_distill
    from fedcollm.encoding import collate, encode_pair
    from fedcollm.models import load_with_lora

    llm = load_with_lora(llm_name, LoraConfig(r=16, dropout=0.0), seed=0)
    slm = load_with_lora(slm_name, LoraConfig(r=8, dropout=0.0), seed=1)
    n = batch_size * (steps + 1)
    requests = [render("commonsense_qa", q) for q in load_questions("commonsense_qa", "train", limit=n)]
    ex_f = [
        encode_pair(llm.tokenizer, r.context, r.continuations[r.gold], add_bos=llm.add_bos) for r in requests
    ]
    ex_g = [
        encode_pair(slm.tokenizer, r.context, r.continuations[r.gold], add_bos=slm.add_bos) for r in requests
    ]
    cfg = DistillConfig(epochs=1, batch_size=batch_size)

    stamps: list[float] = []
    mutual_distill(
        llm.model,
        slm.model,
        ex_f,
        ex_g,
        llm_pad_id=llm.tokenizer.pad_token_id,
        slm_pad_id=slm.tokenizer.pad_token_id,
        llm_lr=1e-4,
        slm_lr=1e-4,
        cfg=cfg,
        train_cfg=TrainConfig(),
        seed=0,
        on_step=lambda step, total, loss: stamps.append(time.perf_counter()),
    )
    ours = median([b - a for a, b in itertools.pairwise(stamps)])

    opt_f = torch.optim.AdamW([p for p in llm.model.parameters() if p.requires_grad], lr=1e-4)
    opt_g = torch.optim.AdamW([p for p in slm.model.parameters() if p.requires_grad], lr=1e-4)
    llm.model.train()
    slm.model.train()
    naive_times = []
    for s in range(steps + 1):
        index = range(s * batch_size, (s + 1) * batch_size)
        batch_f = collate([ex_f[i] for i in index], llm.tokenizer.pad_token_id)
        batch_g = collate([ex_g[i] for i in index], slm.tokenizer.pad_token_id)
        start = time.perf_counter()
        naive_step(llm.model, slm.model, batch_f, batch_g, opt_f, opt_g, cfg.kd_weight, cfg.temperature)
        naive_times.append(time.perf_counter() - start)
    naive = median(naive_times[1:])
    batch_f = collate(ex_f[:batch_size], llm.tokenizer.pad_token_id)
    batch_g = collate(ex_g[:batch_size], slm.tokenizer.pad_token_id)
    f_llm, b_llm = forward_backward_seconds(llm.model, batch_f)
    f_slm, b_slm = forward_backward_seconds(slm.model, batch_g)
    forward, backward = f_llm + f_slm, b_llm + b_slm
    return {
        "ours_s": ours,
        "naive_s": naive,
        "forward_s": forward,
        "backward_s": backward,
        "bound": (2 * forward + backward) / (forward + backward),
        "threads": torch.get_num_threads(),
    }


def run(out: Path, quick: bool = False) -> list[Row]:
    """One row: naive seconds per step / ours, target >= 1.8."""
    quiet()
    steps, batch = (2, 2) if quick else (4, 8)
    m = measure("smollm2-135m", "smollm2-135m", steps, batch)
    return [
        Row(
            "server distillation: 1 vs 4 forwards per batch",
            m["naive_s"] / m["ours_s"],
            1.8,
            detail=f"LLM and SLM SmolLM2-135M, batch {batch} CommonsenseQA: naive {m['naive_s']:.2f} s, "
            f"ours {m['ours_s']:.2f} s per step (median of {steps}); bound (2F+B)/(F+B) = "
            f"{m['bound']:.2f} from forward {m['forward_s']:.2f} s, backward {m['backward_s']:.2f} s",
        )
    ]


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--slm", default="smollm2-135m")
    parser.add_argument("--llm", default="smollm2-135m", help="must share the SLM's tokenizer")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    quiet()
    m = measure(args.slm, args.llm, args.steps, args.batch_size)
    print(f"torch {torch.__version__}, threads {m['threads']}, batch {args.batch_size} CommonsenseQA")
    print(f"{'LLM':<14} {'SLM':<14} {'naive s/step':>12} {'ours s/step':>11} {'ratio':>6} {'bound':>6}")
    print(
        f"{args.llm:<14} {args.slm:<14} {m['naive_s']:>12.2f} {m['ours_s']:>11.2f} "
        f"{m['naive_s'] / m['ours_s']:>5.2f}x {m['bound']:>5.2f}x"
    )


if __name__ == "__main__":
    main()
