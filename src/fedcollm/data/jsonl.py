"""Reader for user-supplied question files (``.jsonl`` or ``.jsonl.gz``).

One JSON object per line: ``question`` (str), ``choices`` (list of >= 2 str), ``gold`` (int
index into choices) and optional ``id`` (str, default ``"<file stem>-<line>"``). Every other
field whose value is a string, number or boolean is kept, as text, in ``MCQuestion.fields``
(what ``task.partition = "field"`` splits clients by: a topic, a subject, a source); other
values are ignored. Blank lines are skipped. Any bad line raises DataError naming file, line,
field.
"""

import gzip
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from fedcollm.data.errors import DataError
from fedcollm.data.types import MCQuestion

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


def is_jsonl_path(source: str | Path) -> bool:
    """Whether ``source`` names a question file by its suffix."""
    return str(source).endswith(JSONL_SUFFIXES)


def _file_stem(path: Path) -> str:
    """``dir/name.jsonl.gz`` -> ``name`` (the default id prefix)."""
    name = path.name
    for suffix in sorted(JSONL_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _open_text(path: Path) -> IO[str]:
    """Open plain or gzip-compressed text by suffix."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def parse_jsonl_record(record: Any, default_id: str, where: str, required: Sequence[str] = ()) -> MCQuestion:
    """Validate one decoded line and build its question; ``where`` is ``file:line``.

    ``required``: further fields the record must hold with a scalar value (the experiment's
    ``task.required_fields``: what every site's data must carry)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    question = record.get("question")
    if not isinstance(question, str):
        raise DataError(f"{where}: field 'question' must be a string, got {question!r}")
    choices = record.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
        raise DataError(f"{where}: field 'choices' must be a list of >= 2 strings, got {choices!r}")
    if not all(isinstance(choice, str) for choice in choices):
        raise DataError(f"{where}: field 'choices' must contain only strings, got {choices!r}")
    gold = record.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, int):
        raise DataError(f"{where}: field 'gold' must be an integer index, got {gold!r}")
    if not 0 <= gold < len(choices):
        raise DataError(
            f"{where}: field 'gold' is {gold}, out of range for {len(choices)} choices "
            f"(valid: 0..{len(choices) - 1})"
        )
    question_id = record.get("id", default_id)
    if not isinstance(question_id, str):
        raise DataError(f"{where}: field 'id' must be a string, got {question_id!r}")
    fields = scalar_fields(record, _QUESTION_KEYS)
    for name in required:
        if name not in fields and (name not in _QUESTION_KEYS or record.get(name) is None):
            held = ", ".join(sorted(str(key) for key in record)) or "none"
            raise DataError(
                f"{where}: field {name!r} is missing or not a scalar (task.required_fields); "
                f"its fields: {held}"
            )
    return MCQuestion(id=question_id, question=question, choices=tuple(choices), gold=gold, fields=fields)


_QUESTION_KEYS = frozenset({"question", "choices", "gold", "id"})


def scalar_fields(record: Mapping[str, Any], skip: frozenset[str]) -> dict[str, str]:
    """The record's scalar fields outside ``skip`` (the question itself), as text: ``"bio"``,
    ``"3"``, ``"true"``; nested values and nulls are left out."""
    extra: dict[str, str] = {}
    for key, value in record.items():
        if key in skip or value is None or isinstance(value, (dict, list)):
            continue
        extra[str(key)] = json.dumps(value) if isinstance(value, bool) else str(value)
    return extra


def read_jsonl_questions(
    path: Path, limit: int | None = None, required: Sequence[str] = ()
) -> list[MCQuestion]:
    """All (or the first ``limit``) questions in a ``.jsonl``/``.jsonl.gz`` file."""
    if not path.is_file():
        raise DataError(f"question file {path} does not exist")
    stem = _file_stem(path)
    questions: list[MCQuestion] = []
    try:
        with _open_text(path) as lines:
            for lineno, line in enumerate(lines, start=1):
                if limit is not None and len(questions) >= limit:
                    break
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
                questions.append(parse_jsonl_record(record, f"{stem}-{lineno}", where, required))
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as exc:
        raise DataError(f"question file {path} is not readable UTF-8 JSONL: {exc}") from exc
    return questions
