"""Evaluation throughput: `fedcollm.evaluation.multiple_choice` against a straightforward per-question loop.

Ours encodes every (question, choice) sequence once (`encode_requests`; the run caches the
result across rounds), sorts all sequences of all questions by length into batches, runs the LM
head only at continuation positions, and scores single-token continuations of one context
(CommonsenseQA's " A" ... " E") with one forward. The straightforward loop encodes each
question's choices when it reaches them and runs one unbatched forward per choice with the
model's own full-vocabulary logits, as a first implementation would. Both score the same
loaded SmolLM2-135M (float32, fresh LoRA adapter as in round 0) on the same questions; the
per-question predictions must agree (acc and acc_norm identical).

Timed: the loop once; ours once cold (encoding included, as in the first evaluation of a run)
and once with the cached encoding (every later round). The row's ratio uses the cached figure;
the detail gives both.

    .venv/bin/python bench/bench_eval_throughput.py [--quick]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchlib import Row, quiet, run_as_script

TASKS = (("arc_easy", 100), ("commonsense_qa", 50))
"""Task and number of validation questions: multi-token choices, and one-token letter choices."""


@torch.no_grad()
def per_question_loop(lm: Any, requests: list[Any]) -> tuple[list[int], list[int]]:
    """acc and acc_norm predictions, one unbatched full-logits forward per choice."""
    from fedcollm.lm.encoding import encode_pair

    model = lm.model
    model.eval()
    predictions, predictions_norm = [], []
    for request in requests:
        scores = []
        for continuation in request.continuations:
            item = encode_pair(lm.tokenizer, request.context, continuation, add_bos=lm.add_bos)
            ids = torch.tensor([item.input_ids])
            logits = model(input_ids=ids).logits[0]
            logprobs = torch.log_softmax(logits[item.n_context - 1 : -1].float(), dim=-1).double()
            targets = ids[0, item.n_context :]
            scores.append(float(logprobs.gather(1, targets.unsqueeze(1)).sum()))
        lengths = np.array([float(len(text)) for text in request.choice_texts])
        predictions.append(int(np.argmax(scores)))
        predictions_norm.append(int(np.argmax(np.array(scores) / lengths)))
    return predictions, predictions_norm


def measure(task: str, n: int, batch_size: int = 16) -> dict[str, Any]:
    """Seconds of the loop, of ours cold and cached; whether their predictions agree."""
    from fedcollm.config import LoraConfig
    from fedcollm.data import load_questions, render
    from fedcollm.evaluation.multiple_choice import encode_requests, evaluate
    from fedcollm.lm.models import load_with_lora

    lm = load_with_lora("smollm2-135m", LoraConfig(), seed=1)
    requests = [render(task, q) for q in load_questions(task, "validation", limit=n)]
    start = time.perf_counter()
    encoded = encode_requests(lm.tokenizer, requests, add_bos=lm.add_bos)
    cold = evaluate(lm.model, lm.tokenizer, encoded, add_bos=lm.add_bos, batch_size=batch_size)
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    cached = evaluate(lm.model, lm.tokenizer, encoded, add_bos=lm.add_bos, batch_size=batch_size)
    cached_s = time.perf_counter() - start
    start = time.perf_counter()
    loop, loop_norm = per_question_loop(lm, requests)
    loop_s = time.perf_counter() - start
    same = sum(
        a == b and c == d
        for a, b, c, d in zip(cached.predictions, loop, cached.predictions_norm, loop_norm, strict=True)
    )
    return {
        "task": task,
        "questions": len(requests),
        "sequences": len(encoded.sequences),
        "cold_s": cold_s,
        "cached_s": cached_s,
        "loop_s": loop_s,
        "same_predictions": same,
        "identical_acc": cold.predictions == cached.predictions
        and loop == cached.predictions
        and loop_norm == cached.predictions_norm,
        "acc": cached.acc,
        "acc_norm": cached.acc_norm,
    }


def run(out: Path, quick: bool = False) -> list[Row]:
    """One row per task: questions/s of ours (cached encoding) / the loop's, target >= 3."""
    quiet()
    rows = []
    for task, n in TASKS:
        m = measure(task, 4 if quick else n)
        q = m["questions"]
        rows.append(
            Row(
                f"evaluation throughput vs per-question loop, {task}",
                m["loop_s"] / m["cached_s"],
                3.0,
                detail=f"{q} questions ({m['sequences']} choices): loop {q / m['loop_s']:.2f} q/s, ours "
                f"{q / m['cached_s']:.2f} q/s cached ({q / m['cold_s']:.2f} q/s with encoding, "
                f"x{m['loop_s'] / m['cold_s']:.2f}); same predictions {m['same_predictions']}/{q}, "
                f"acc {m['acc']:.3f}, identical: {'yes' if m['identical_acc'] else 'NO'}",
                ok=m["identical_acc"],
                extra=m,
            )
        )
    return rows


def main() -> None:
    run_as_script(run, __doc__)


if __name__ == "__main__":
    main()
