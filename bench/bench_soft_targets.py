"""Soft targets across tokenizers: how many answer positions carry the teacher's distribution.

Distillation between models that tokenise differently (FedCoLLM with a Gemma-3 server and
SmolLM2 clients, FedMKT in both directions) carries a teacher's top-K distribution onto a
student answer token only where the DTW alignment matches the two tokens 1:1. FuseLLM's
reference (`transform_step_logits`) further requires the pair to agree -- the same string, or
the MinED map sending the teacher's token to the student's -- and gives a one-hot elsewhere,
since the teacher's distribution at a different token predicts another next token.

For SmolLM2-135M <-> Gemma-3-270M on ARC-Easy's gold answers (the lm-eval prompt, as FedCoLLM
and FedMKT encode them), this prints, per direction, the share of student answer positions
that carry a soft target when every 1:1 pair does (before the agreement test) and when only
agreeing pairs do (after). No timing: the figures do not depend on the machine.

    .venv/bin/python bench/bench_soft_targets.py [--quick]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchlib import Row, quiet, run_as_script

MODELS = ("smollm2-135m", "gemma3-270m")


def answer_ids(tokenizer: object, requests: list, add_bos: bool) -> list[tuple[int, ...]]:
    """Each request's gold answer tokens, encoded as training encodes them (no length cut)."""
    from fedcollm.lm.training_items import encode_sft

    return [e.answer_ids for e in encode_sft(tokenizer, requests, add_bos=add_bos, max_length=10**6)]  # type: ignore[arg-type]


def shares(split: str, limit: int | None) -> dict[str, tuple[int, int, int]]:
    """Per direction 'teacher -> student': (student answer positions, 1:1 matched, agreeing)."""
    from fedcollm.align import TokenBridge, agreeing_matches, align_positions
    from fedcollm.data import load_questions
    from fedcollm.data.tasks import get_task
    from fedcollm.lm.loading import load_tokenizer, needs_bos

    task = get_task("arc_easy")
    requests = [task.lm_eval_template.build(q) for q in load_questions("arc_easy", split, limit=limit)]
    toks = {name: load_tokenizer(name) for name in MODELS}
    ids = {name: answer_ids(tok, requests, needs_bos(tok)) for name, tok in toks.items()}
    out: dict[str, tuple[int, int, int]] = {}
    for src, dst in (MODELS, MODELS[::-1]):
        bridge = TokenBridge.build(toks[src], toks[dst])
        total = matched = agreeing = 0
        for src_ids, dst_ids in zip(ids[src], ids[dst], strict=True):
            src_tokens = bridge.src_norm.normalize_ids(bridge.src_tok, list(src_ids))
            dst_tokens = bridge.dst_norm.normalize_ids(bridge.dst_tok, list(dst_ids))
            match = align_positions(src_tokens, dst_tokens)
            kept = agreeing_matches(
                match, np.array(src_ids), np.array(dst_ids), src_tokens, dst_tokens, bridge.vocab_map
            )
            total += len(dst_ids)
            matched += int((match >= 0).sum())
            agreeing += int((kept >= 0).sum())
        out[f"{src} -> {dst}"] = (total, matched, agreeing)
    return out


def run(out: Path, quick: bool = False) -> list[Row]:
    """Rows: the soft-target share before and after the agreement test, per direction."""
    quiet()
    rows: list[Row] = []
    for split, limit in (("train", 50 if quick else None), ("test", 50 if quick else None)):
        for direction, (total, matched, agreeing) in shares(split, limit).items():
            detail = f"ARC-Easy {split}, {total} student answer positions"
            for kind, count in (("1:1 pairs", matched), ("agreeing pairs", agreeing)):
                name = f"soft targets {direction}, {kind} ({split})"
                rows.append(Row(name, 100 * count / total, unit="%", detail=detail))
    return rows


if __name__ == "__main__":
    run_as_script(run, __doc__)
