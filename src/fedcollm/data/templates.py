"""Prompt templates: how one question becomes one scored request.

A template is a small object with ``build(question) -> MCRequest``. Templates are composed
into named formats (see ``formats.py``) and attached to tasks (see ``tasks.py``), so adding a
prompt style never means adding another branch to an if/elif chain.
"""

import string
from dataclasses import dataclass
from typing import Protocol

from fedcollm.data.errors import DataError
from fedcollm.data.types import MCQuestion, MCRequest

#: lm-eval's target delimiter: every continuation starts with it.
TARGET_DELIMITER = " "


class PromptTemplate(Protocol):
    """Anything that turns a question into a request."""

    def build(self, question: MCQuestion) -> MCRequest:
        """Render ``question`` into the context and continuations a model scores."""
        ...


def _answer_text_request(question: MCQuestion, context: str) -> MCRequest:
    """Request whose choices are the answer texts themselves (cloze / ranked classification)."""
    return MCRequest(
        id=question.id,
        context=context,
        continuations=tuple(TARGET_DELIMITER + text for text in question.choices),
        choice_texts=question.choices,
        gold=question.gold,
    )


@dataclass(frozen=True)
class QuestionAnswerTemplate:
    """``"Question: {question}\\nAnswer:"`` scored against each answer text.

    lm-eval's ARC prompt and OLMES' cloze ("RC") prompt for every task.
    """

    def build(self, question: MCQuestion) -> MCRequest:
        """Wrap the question in Question:/Answer: and score the answer texts."""
        return _answer_text_request(question, f"Question: {question.question}\nAnswer:")


@dataclass(frozen=True)
class BareQuestionTemplate:
    """The question text alone as context, scored against each answer text.

    lm-eval's OpenBookQA prompt: ``doc_to_text: question_stem`` (the stem is a sentence
    prefix the answer completes, so no Question:/Answer: wrapping).
    """

    def build(self, question: MCQuestion) -> MCRequest:
        """Use the bare question as context and score the answer texts."""
        return _answer_text_request(question, question.question)


@dataclass(frozen=True)
class LetteredChoicesTemplate:
    """Question plus lettered options; the model scores the letters.

    lm-eval's CommonsenseQA prompt: ``"Question: {{ question.strip() }}\\nA. {{c0}}\\n...
    \\nAnswer:"`` with ``doc_to_choice: ['A', 'B', 'C', 'D', 'E']``. Letters follow the number
    of choices, so the template also works for questions with fewer or more options.
    """

    def build(self, question: MCQuestion) -> MCRequest:
        """List the choices under letters A, B, ... and score ``" A"``, ``" B"``, ..."""
        letters = string.ascii_uppercase
        if len(question.choices) > len(letters):
            raise DataError(
                f"question {question.id!r}: {len(question.choices)} choices exceed the "
                f"{len(letters)} available letters"
            )
        labels = tuple(letters[: len(question.choices)])
        options = "".join(f"\n{label}. {text}" for label, text in zip(labels, question.choices, strict=True))
        return MCRequest(
            id=question.id,
            context=f"Question: {question.question.strip()}{options}\nAnswer:",
            continuations=tuple(TARGET_DELIMITER + label for label in labels),
            choice_texts=labels,
            gold=question.gold,
        )
