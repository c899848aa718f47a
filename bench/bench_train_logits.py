"""Training step with logits only at loss positions vs a plain full-logits step.

Prints tokens/s of a LoRA SFT step (forward + backward + AdamW) both ways, side by side in one
run, for each model, and their ratio. Usage:

    .venv/bin/python bench/bench_train_logits.py [--models smollm2-135m gemma3-270m] [--steps 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from fedcollm.config import LoraConfig
from fedcollm.data import load_questions, render
from fedcollm.lm.encoding import Batch, collate, encode_pair
from fedcollm.lm.logits import answer_cross_entropy, full_logits, target_logits
from fedcollm.lm.models import load_with_lora


def _step_time(model, batch: Batch, logits_fn: Callable, steps: int) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for _ in range(steps + 1):  # first step warms up
        start = time.perf_counter()
        loss = answer_cross_entropy(logits_fn(model, batch), batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    questions = load_questions("arc_easy", "train", limit=args.batch_size)
    requests = [render("arc_easy", q) for q in questions]
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"batch {args.batch_size} ARC-Easy prompts"
    )
    print(f"{'model':<14} {'tokens':>6} {'targets':>7} {'full tok/s':>10} {'ours tok/s':>10} {'ratio':>6}")
    for name in args.models:
        lm = load_with_lora(name, LoraConfig(r=8, dropout=0.0), seed=0)
        items = [
            encode_pair(lm.tokenizer, r.context, r.continuations[r.gold], add_bos=lm.add_bos)
            for r in requests
        ]
        batch = collate(items, lm.tokenizer.pad_token_id, device="cpu")
        tokens = int(batch.attention_mask.sum())
        full = _step_time(lm.model, batch, full_logits, args.steps)
        ours = _step_time(lm.model, batch, target_logits, args.steps)
        print(
            f"{name:<14} {tokens:>6} {batch.num_targets:>7} {tokens / full:>10.1f} {tokens / ours:>10.1f} "
            f"{full / ours:>5.2f}x"
        )


if __name__ == "__main__":
    main()
