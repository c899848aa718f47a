"""Evaluation items answered in free text: each model's prompt and stops, its answers, their scores.

A `GenerationItem` holds either a plain prompt (a short-answer question in lm-eval's words), which
every model reads as it is, or a conversation, which each model reads through its own chat
template (a model without one: the run's plain template) with the generation prompt added, as
it was trained (`fedcollm.lm.chat`). Answers are generated as lm-eval's `generate_until` makes
them (`fedcollm.evaluation.generation`), stopping at the item's stop sequences, the model's end of
text and, for a conversation, the chat template's end of turn; each is scored against the item's
references with exact match, token F1 and Rouge-L.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
from peft import PeftModel
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedcollm.data.generative import GenerationItem
from fedcollm.data.instructions import InstructionExample
from fedcollm.evaluation.generation import GenerationSettings, generate_until
from fedcollm.evaluation.records import GENERATION_METRICS, GeneratedRecord
from fedcollm.evaluation.text_metrics import score_text
from fedcollm.lm.chat import render_chat


def end_of_turn(tokenizer: PreTrainedTokenizerBase, example: InstructionExample, plain: str) -> str:
    """What the chat template writes after a response (e.g. "<|im_end|>"), stripped; "" if nothing
    but whitespace (or only the end-of-text token a plain template appends, a stop anyway)."""
    _, rendered = render_chat(tokenizer, example, plain)
    if example.response not in rendered:
        return ""
    return rendered.split(example.response, 1)[1].strip()


def prompt_for(
    tokenizer: PreTrainedTokenizerBase, item: GenerationItem, *, add_bos: bool, plain: str
) -> tuple[str, tuple[str, ...], bool]:
    """(prompt text, stop sequences, whether BOS goes before it) for one item and model."""
    if isinstance(item.prompt, str):
        return item.prompt, item.until, add_bos
    prompt, _ = render_chat(tokenizer, item.prompt, plain)
    stops = list(item.until)
    marker = end_of_turn(tokenizer, item.prompt, plain)
    if marker and marker not in stops:
        stops.append(marker)
    # A chat template writes its own BOS into the text; a plain template does not.
    return prompt, tuple(stops), add_bos and not tokenizer.chat_template


def answer_items(
    model: PeftModel | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[GenerationItem],
    *,
    add_bos: bool,
    plain: str,
    settings: GenerationSettings,
    seed: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[GeneratedRecord]:
    """Each item's generated answer and its scores, in the items' order.

    Items with the same stops and BOS rule are generated together (`settings.until` is replaced
    by each group's stops); a short-answer task has one group.
    """
    prompts = [prompt_for(tokenizer, item, add_bos=add_bos, plain=plain) for item in items]
    groups: dict[tuple[tuple[str, ...], bool], list[int]] = {}
    for index, (_, stops, bos) in enumerate(prompts):
        groups.setdefault((stops, bos), []).append(index)
    answers: dict[int, str] = {}
    for (stops, bos), indices in groups.items():
        texts = generate_until(
            model,
            tokenizer,
            [prompts[i][0] for i in indices],
            add_bos=bos,
            settings=replace(settings, until=stops),
            seed=seed,
            on_batch=on_batch,
        )
        answers.update(zip(indices, texts, strict=True))
    records = []
    for index, item in enumerate(items):
        scores = score_text(answers[index], item.references)
        records.append(
            GeneratedRecord(
                item.id, answers[index], item.references, scores.exact_match, scores.f1, scores.rouge_l
            )
        )
    return records


def summary(records: Sequence[GeneratedRecord]) -> dict[str, float]:
    """Each metric's mean over the records with its standard error (sample standard deviation over
    sqrt(n), as lm-eval reports `_stderr`), and `n`."""
    out: dict[str, float] = {}
    for metric in GENERATION_METRICS:
        values = np.asarray([r.score(metric) for r in records], dtype=np.float64)
        out[metric] = float(values.mean()) if values.size else float("nan")
        out[f"{metric}_stderr"] = (
            float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else float("nan")
        )
    out["n"] = float(len(records))
    return out
