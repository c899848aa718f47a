"""Multiple-choice question files in every format a site may hold them in.

JSONL (``.jsonl``/``.jsonl.gz``) is read line by line, so errors name the line an editor shows;
JSON, CSV, Parquet and ``datasets.save_to_disk`` folders are read through `datasets`
(`fedcollm.data.tables`), and errors name the row (1-based, a CSV's header not counted). Every
record has the fields of a JSONL question line (``question``, ``choices``, ``gold``, ``id``?);
in a CSV, whose cells hold no lists, ``choices`` is a JSON list in one cell
(``"[""oxygen"", ""carbon dioxide""]"``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedcollm.data.errors import DataError
from fedcollm.data.jsonl import is_jsonl_path, parse_jsonl_record, read_jsonl_questions
from fedcollm.data.tables import read_rows
from fedcollm.data.types import MCQuestion


def _decoded_choices(record: dict[str, Any], where: str) -> dict[str, Any]:
    """A CSV cell's JSON list of choices as a list (other formats hold a list already)."""
    choices = record.get("choices")
    if not isinstance(choices, str):
        return record
    try:
        decoded = json.loads(choices)
    except json.JSONDecodeError:
        raise DataError(
            f"{where}: field 'choices' must be a list of >= 2 strings (in a CSV: a JSON list such as "
            f'["oxygen", "carbon dioxide"]), got {choices!r}'
        ) from None
    return {**record, "choices": decoded}


def read_question_file(
    path: str | Path, limit: int | None = None, required: Sequence[str] = ()
) -> list[MCQuestion]:
    """All (or the first `limit`) questions of a file or saved dataset, each holding `required`.

    Raises `DataError` naming file, line or row, and field, at the first record that does not
    fit, and for a file that holds no question.
    """
    path = Path(path)
    if is_jsonl_path(path):
        questions = read_jsonl_questions(path, limit, required)
    else:
        rows = read_rows(path)
        questions = []
        for row, record in enumerate(rows, start=1):
            if limit is not None and len(questions) >= limit:
                break
            where = f"{path}:{row}"
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a record, got {type(record).__name__}")
            questions.append(
                parse_jsonl_record(_decoded_choices(record, where), f"{path.stem}-{row}", where, required)
            )
    if not questions:
        raise DataError(f"data file {path} holds no questions")
    return questions
