"""Free-text items: what a model trains on and is asked when it writes its answer.

Two item types sit beside the multiple-choice `MCRequest`:

- `TextPair`: a training example in plain text, a prompt and the continuation a model is to write
  after it (a short-answer question in lm-eval's prompt and its answer, ending where generation
  stops). The loss falls on the continuation only, as for a multiple-choice question's gold
  continuation.
- `GenerationItem`: an evaluation example answered in free text: a plain prompt or a
  conversation (rendered with each model's own chat template), the references any of which counts
  as right, and the stop sequences.

A conversation to train on stays an `InstructionExample`: how it becomes text depends on each
model's chat template, so `fedcollm.lm` renders it per tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedcollm.data.errors import DataError
from fedcollm.data.instructions import InstructionExample
from fedcollm.data.types import MCRequest


@dataclass(frozen=True)
class TextPair:
    """A prompt and the text a model should continue it with."""

    id: str
    prompt: str
    target: str

    def __post_init__(self) -> None:
        if not self.target:
            raise DataError(f"example {self.id!r}: empty target")


@dataclass(frozen=True)
class GenerationItem:
    """One example answered in free text and scored against `references`."""

    id: str
    prompt: str | InstructionExample
    """Plain prompt text, or a conversation whose turns before its response are the prompt."""
    references: tuple[str, ...]
    until: tuple[str, ...]
    """Stop sequences besides the model's end of text (and, for a conversation, its end of turn)."""

    def __post_init__(self) -> None:
        if not self.references or not all(r.strip() for r in self.references):
            raise DataError(f"example {self.id!r}: needs at least one non-empty reference")


TrainItem = MCRequest | TextPair | InstructionExample
"""What a model trains on (and distils on): a context, and a target that carries the loss."""

EvalItem = MCRequest | GenerationItem
"""What a model is evaluated on: a question it chooses the answer to, or one it writes the answer to."""


def target_text(item: TrainItem) -> str:
    """The text a training item's loss falls on: a question's gold continuation, a pair's target,
    a conversation's response (before any chat template adds to it)."""
    if isinstance(item, MCRequest):
        return item.continuations[item.gold]
    if isinstance(item, TextPair):
        return item.target
    return item.response
