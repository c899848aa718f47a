"""4-bit NF4 base weights against unquantised ones: zero-shot accuracy on the same questions.

Each packaged model is loaded twice (float32, and with `quantization = "4bit"`: bitsandbytes'
NF4 with double quantisation, computing in float32) and scored with the same evaluator on the
same ARC-Easy test questions. The row is the accuracy difference in points with its 95 % paired
bootstrap interval and the exact McNemar p-value (`fedcollm.experiment.paired`); the detail
gives both accuracies and how many questions got the same answer. The packaged weights are
themselves dequantised GGUF files (Q4_1 and Q4_K_M), so this measures NF4 re-quantisation of
those weights.

    .venv/bin/python bench/bench_quantization.py [--quick]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from benchlib import Row, quiet, run_as_script

MODELS = ("smollm2-135m", "gemma3-270m")
QUESTIONS = 300


def measure(model: str, n: int) -> dict[str, Any]:
    from fedcollm.data import load_questions, render, sample_indices
    from fedcollm.evaluation.multiple_choice import encode_requests, evaluate
    from fedcollm.experiment.paired import bootstrap_interval, mcnemar
    from fedcollm.lm.loading import load_base_model, load_tokenizer, needs_bos

    pool = load_questions("arc_easy", "test", "auto")
    requests = [render("arc_easy", pool[i], "lm_eval") for i in sample_indices(len(pool), n, 0)]
    tokenizer = load_tokenizer(model)
    encoded = encode_requests(tokenizer, requests, add_bos=needs_bos(tokenizer))
    correct, seconds, predictions = {}, {}, {}
    for quantization in ("none", "4bit"):
        lm = load_base_model(model, quantization=quantization)
        start = time.perf_counter()
        result = evaluate(lm, tokenizer, encoded, add_bos=needs_bos(tokenizer), batch_size=16)
        seconds[quantization] = time.perf_counter() - start
        predictions[quantization] = np.asarray(result.predictions)
        correct[quantization] = predictions[quantization] == np.asarray([r.gold for r in requests])
        del lm
    diff = correct["4bit"].astype(float) - correct["none"].astype(float)
    low, high = bootstrap_interval(diff)
    test = mcnemar(correct["4bit"], correct["none"])
    return {
        "n": n,
        "acc_none": float(correct["none"].mean()),
        "acc_4bit": float(correct["4bit"].mean()),
        "delta_points": 100 * float(diff.mean()),
        "ci_points": (100 * low, 100 * high),
        "mcnemar_p": test.p,
        "same_answer": int((predictions["none"] == predictions["4bit"]).sum()),
        "seconds": seconds,
    }


def run(out: Path, quick: bool = False) -> list[Row]:
    quiet()
    rows = []
    for model in MODELS[:1] if quick else MODELS:
        m = measure(model, 20 if quick else QUESTIONS)
        low, high = m["ci_points"]
        rows.append(
            Row(
                f"4-bit NF4 vs float32: ARC-Easy acc, {model}",
                m["delta_points"],
                unit="pt",
                detail=(
                    f"n={m['n']}: float32 {m['acc_none']:.3f}, NF4 {m['acc_4bit']:.3f}; "
                    f"{m['delta_points']:+.1f} [{low:+.1f}, {high:+.1f}] points, "
                    f"McNemar p={m['mcnemar_p']:.2g}; "
                    f"same answer on {m['same_answer']}/{m['n']}; evaluation {m['seconds']['none']:.0f} s "
                    f"float32, {m['seconds']['4bit']:.0f} s NF4"
                ),
                extra=m,
            )
        )
    return rows


if __name__ == "__main__":
    run_as_script(run, __doc__)
