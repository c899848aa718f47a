"""Server distillation step: one forward per model per batch (ours) vs the naive four.

The naive step runs, for each direction, a no-grad teacher forward and a student forward:
four forwards per batch. Ours runs each model once; its logits are its student output and,
detached, the other model's teacher. Both give the same losses; this prints seconds per step of
each, side by side in one run, and their ratio. Usage:

    .venv/bin/python bench/bench_distill.py [--slm smollm2-135m] [--llm smollm2-135m] [--steps 4]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedcollm.config import DistillConfig, LoraConfig, TrainConfig
from fedcollm.data import load_questions, render
from fedcollm.distill import kd_loss, mutual_distill
from fedcollm.encoding import collate, encode_pair
from fedcollm.forward import answer_cross_entropy, target_logits
from fedcollm.models import load_with_lora


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slm", default="smollm2-135m")
    parser.add_argument("--llm", default="smollm2-135m", help="must share the SLM's tokenizer")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    llm = load_with_lora(args.llm, LoraConfig(r=16, dropout=0.0), seed=0)
    slm = load_with_lora(args.slm, LoraConfig(r=8, dropout=0.0), seed=1)
    n = args.batch_size * (args.steps + 1)
    requests = [render("commonsense_qa", q) for q in load_questions("commonsense_qa", "train", limit=n)]
    ex_f = [
        encode_pair(llm.tokenizer, r.context, r.continuations[r.gold], add_bos=llm.add_bos) for r in requests
    ]
    ex_g = [
        encode_pair(slm.tokenizer, r.context, r.continuations[r.gold], add_bos=slm.add_bos) for r in requests
    ]
    cfg = DistillConfig(epochs=1, batch_size=args.batch_size)

    start = time.perf_counter()
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
    )
    ours = (time.perf_counter() - start) / (args.steps + 1)

    opt_f = torch.optim.AdamW([p for p in llm.model.parameters() if p.requires_grad], lr=1e-4)
    opt_g = torch.optim.AdamW([p for p in slm.model.parameters() if p.requires_grad], lr=1e-4)
    llm.model.train()
    slm.model.train()
    start = time.perf_counter()
    for s in range(args.steps + 1):
        index = range(s * args.batch_size, (s + 1) * args.batch_size)
        batch_f = collate([ex_f[i] for i in index], llm.tokenizer.pad_token_id)
        batch_g = collate([ex_g[i] for i in index], slm.tokenizer.pad_token_id)
        naive_step(llm.model, slm.model, batch_f, batch_g, opt_f, opt_g, cfg.kd_weight, cfg.temperature)
    naive = (time.perf_counter() - start) / (args.steps + 1)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch_size} CommonsenseQA"
    )
    print(f"{'LLM':<14} {'SLM':<14} {'naive s/step':>12} {'ours s/step':>11} {'ratio':>6}")
    print(f"{args.llm:<14} {args.slm:<14} {naive:>12.2f} {ours:>11.2f} {naive / ours:>5.2f}x")


if __name__ == "__main__":
    main()
