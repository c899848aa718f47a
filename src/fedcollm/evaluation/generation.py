"""Answers generated until a stop sequence, as lm-evaluation-harness's `generate_until` makes them.

Batched decoding with the key/value cache (`model.generate`, `use_cache=True`), greedy by default
or sampled and seeded. It follows HFLM 0.4.13 step by step, so a greedy answer here is the one
lm-eval's `generate_until` gives (`tests/test_generation.py` runs both on the same prompts):

- prompts sorted by descending token count (ties by text), batched in that order, answers
  returned in the prompts' order;
- each prompt encoded as the tokenizer encodes it with BOS where lm-eval adds one, left padded,
  and cut on the left to `context_window - max_new_tokens` tokens;
- the stop sequences are the given ones plus the EOS token's text; a row stops once its new text
  contains one, the batch once every row has, or after `max_new_tokens`;
- the new tokens decoded without special tokens and cut before the first stop sequence.

Scores of each answer against its references: `fedcollm.evaluation.text_metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from peft import PeftModel
from transformers import PreTrainedModel, StoppingCriteria, StoppingCriteriaList
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedcollm.errors import FedcollmError
from fedcollm.evaluation.multiple_choice import context_window
from fedcollm.evaluation.text_metrics import TextScores, score_text
from fedcollm.lm.devices import model_device
from fedcollm.lm.encoding import pad_id


class GenerationError(FedcollmError, ValueError):
    """Generation settings that cannot work (no room for the answer, an empty stop sequence)."""


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are decoded. Greedy unless `do_sample`; sampling is seeded by the caller."""

    max_new_tokens: int = 32
    until: tuple[str, ...] = ("\n",)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not stop for stop in self.until):
            raise GenerationError(f"stop sequences must not be empty, got {list(self.until)}")
        if self.batch_size < 1:
            raise GenerationError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.do_sample and not self.temperature > 0:
            raise GenerationError(f"sampling needs temperature > 0, got {self.temperature}")


class _StopSequences(StoppingCriteria):
    """Marks a row done once its generated text contains a stop sequence (lm-eval's
    `MultiTokenEOSCriteria` does the same per row; transformers stops when every row is done)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.prompt_length = prompt_length

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=False)
        done = [any(stop in text for stop in self.stops) for text in texts]
        return cast(torch.BoolTensor, torch.tensor(done, dtype=torch.bool, device=input_ids.device))


def stop_sequences(tokenizer: PreTrainedTokenizerBase, until: Sequence[str]) -> list[str]:
    """`until` and the EOS token's text (lm-eval's `handle_stop_sequences`), without repeats."""
    stops = list(dict.fromkeys(until))
    if tokenizer.eos_token_id is not None:
        eos = str(tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False))
        if eos and eos not in stops:
            stops.append(eos)
    return stops


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the first occurrence of each stop sequence in turn (lm-eval's
    `postprocess_generated_text`)."""
    for stop in stops:
        text = text.split(stop)[0]
    return text


def _encode(tokenizer: PreTrainedTokenizerBase, prompt: str, add_bos: bool, keep: int) -> list[int]:
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if add_bos and tokenizer.bos_token_id is not None:
        ids = [int(tokenizer.bos_token_id), *ids]
    return ids[-keep:]


@torch.no_grad()
def generate_until(
    model: PeftModel | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    add_bos: bool,
    settings: GenerationSettings = GenerationSettings(),
    seed: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[str]:
    """One answer per prompt, in the prompts' order (see the module docstring for the rules)."""
    keep = context_window(model, tokenizer) - settings.max_new_tokens
    if keep < 1:
        raise GenerationError(
            f"max_new_tokens={settings.max_new_tokens} leaves no room for a prompt in the model's "
            f"{context_window(model, tokenizer)}-token window"
        )
    stops = stop_sequences(tokenizer, settings.until)
    encoded = [_encode(tokenizer, prompt, add_bos, keep) for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), prompts[i]))
    pad = pad_id(tokenizer)
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
        if settings.do_sample
        else {"do_sample": False}
    )
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    answers: dict[int, str] = {}
    total = -(-len(order) // settings.batch_size)
    device = model_device(model)
    for b, start in enumerate(range(0, len(order), settings.batch_size)):
        rows = order[start : start + settings.batch_size]
        length = max(len(encoded[i]) for i in rows)
        input_ids = torch.tensor(
            [[pad] * (length - len(encoded[i])) + encoded[i] for i in rows], device=device
        )
        attention = torch.tensor(
            [[0] * (length - len(encoded[i])) + [1] * len(encoded[i]) for i in rows], device=device
        )
        # peft forwards `generate` to the base model, and transformers types it with a self type
        # of its own; neither spelling type-checks, so the call is left untyped.
        generator: Any = model
        sequences = generator.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=settings.max_new_tokens,
            stopping_criteria=StoppingCriteriaList([_StopSequences(tokenizer, stops, length)]),
            pad_token_id=pad,
            use_cache=True,
            **sampling,
        )
        for i, new_tokens in zip(rows, sequences[:, length:].tolist(), strict=True):
            answers[i] = cut_at_stop(str(tokenizer.decode(new_tokens, skip_special_tokens=True)), stops)
        if on_batch is not None:
            on_batch(b + 1, total)
    model.train(was_training)
    return [answers[i] for i in range(len(prompts))]


@dataclass(frozen=True)
class GenerationRecord:
    """One evaluated example: what the model wrote and how it scores against the references."""

    id: str
    prediction: str
    references: tuple[str, ...]
    scores: TextScores

    def as_dict(self) -> dict[str, Any]:
        """The record as one JSON line of a run's `questions/` files."""
        return {
            "id": self.id,
            "prediction": self.prediction,
            "references": list(self.references),
            "exact_match": self.scores.exact_match,
            "f1": self.scores.f1,
            "rouge_l": self.scores.rouge_l,
        }


@dataclass(frozen=True)
class GenerationResult:
    """Mean exact match, token F1 and Rouge-L over a set, with the per-example records."""

    records: tuple[GenerationRecord, ...]

    @property
    def n(self) -> int:
        return len(self.records)

    def mean(self, metric: str) -> float:
        """The mean of `exact_match`, `f1` or `rouge_l` over the records."""
        if not self.records:
            return float("nan")
        return sum(float(getattr(r.scores, metric)) for r in self.records) / self.n

    def summary(self) -> dict[str, float]:
        return {
            "exact_match": self.mean("exact_match"),
            "f1": self.mean("f1"),
            "rouge_l": self.mean("rouge_l"),
            "n": float(self.n),
        }


def evaluate_generation(
    model: PeftModel | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[tuple[str, str, Sequence[str]]],
    *,
    add_bos: bool,
    settings: GenerationSettings = GenerationSettings(),
    seed: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Generate an answer to each `(id, prompt, references)` and score it against its references."""
    if not examples:
        raise GenerationError("no examples to evaluate")
    answers = generate_until(
        model,
        tokenizer,
        [prompt for _, prompt, _ in examples],
        add_bos=add_bos,
        settings=settings,
        seed=seed,
        on_batch=on_batch,
    )
    return GenerationResult(
        tuple(
            GenerationRecord(example_id, answer, tuple(refs), score_text(answer, refs))
            for (example_id, _, refs), answer in zip(examples, answers, strict=True)
        )
    )
