"""Value types shared by the loaders, prompt formats and evaluators."""

from collections.abc import Mapping
from dataclasses import dataclass, field

from fedcollm.data.errors import DataError


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question, independent of any prompt format.

    Kept format-free so the same question can be rendered lm-eval style for evaluation and
    in another style for training, and so sources (package files, hub, JSONL) agree on it.
    """

    id: str
    question: str  # the bare question text (no "Question:"/"Answer:" wrapping)
    choices: tuple[str, ...]  # answer texts
    gold: int  # index into choices
    # Descriptive fields of the record (ARC's exam "source", a JSONL file's extra columns), what
    # `task.partition = "field"` splits clients by; never part of a prompt.
    fields: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise DataError(f"question {self.id!r}: needs at least 2 choices, got {self.choices}")
        if not 0 <= self.gold < len(self.choices):
            raise DataError(
                f"question {self.id!r}: gold {self.gold} is out of range for {len(self.choices)} choices"
            )


@dataclass(frozen=True)
class MCRequest:
    """What a language model scores for one question, lm-evaluation-harness style.

    The model scores ``context + continuations[i]`` for every i; the prediction is the
    argmax of the log-likelihoods (acc) or of the log-likelihood divided by
    ``len(choice_texts[i])`` (acc_norm, as lm-eval computes it).
    """

    id: str
    context: str  # the prompt, e.g. "Question: ...\nAnswer:"
    continuations: tuple[str, ...]  # scored strings with their leading delimiter, e.g. " text"
    choice_texts: tuple[str, ...]  # lm-eval's doc_to_choice strings (no leading space)
    gold: int

    def __post_init__(self) -> None:
        if len(self.continuations) != len(self.choice_texts):
            raise DataError(
                f"request {self.id!r}: {len(self.continuations)} continuations but "
                f"{len(self.choice_texts)} choice texts"
            )
        if not 0 <= self.gold < len(self.continuations):
            raise DataError(
                f"request {self.id!r}: gold {self.gold} is out of range for {len(self.continuations)} choices"
            )
