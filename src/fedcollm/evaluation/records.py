"""Per-question records of an evaluation: what paired comparisons between runs are made of.

An evaluation of one model (one role, one client or the server's, one question set, one round)
becomes one JSON Lines file in the run folder, `questions/<name>.jsonl` (`QuestionSet.file_name`),
one line per question in evaluation order:

    {"round": 2, "role": "slm", "client": null, "set": "eval", "id": "Mercury_7220990",
     "gold": 2, "pred": 1, "pred_norm": 2,
     "loglikelihoods": [-7.31, -5.02, -6.11, -9.4], "lengths": [12, 9, 15, 11]}

`pred` is the argmax of the summed continuation log-likelihoods (lm-eval's `acc`), `pred_norm` of
those sums divided by `lengths`, each choice text's length in characters (`acc_norm`). The
question is right in `acc` when `pred == gold`. Log-likelihoods are written with every digit of
their float64 value, so the accuracies recomputed from a file are those the run reported.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fedcollm.data import MCRequest
from fedcollm.errors import FedcollmError

QUESTIONS_DIR = "questions"
"""The run folder's subfolder of per-question records."""
WIRE_KEY = "questions.loglikelihoods"
"""The reply array in which a client returns its per-choice log-likelihoods (flat, float64)."""


class RecordsError(FedcollmError, ValueError):
    """A per-question record file or message that cannot be read as one."""


@dataclass(frozen=True)
class QuestionRecord:
    """One question as one model scored it."""

    id: str
    gold: int
    pred: int
    pred_norm: int
    loglikelihoods: tuple[float, ...]
    lengths: tuple[int, ...]

    @property
    def correct(self) -> bool:
        """Right in lm-eval's `acc`."""
        return self.pred == self.gold

    @property
    def correct_norm(self) -> bool:
        """Right in lm-eval's `acc_norm`."""
        return self.pred_norm == self.gold


def choice_lengths(request: MCRequest) -> tuple[int, ...]:
    """Each choice text's length in characters: lm-eval's `acc_norm` divisor."""
    return tuple(len(text) for text in request.choice_texts)


def question_record(request: MCRequest, loglikelihoods: Sequence[float]) -> QuestionRecord:
    """A question's record from its choices' summed log-likelihoods, predicted as lm-eval does."""
    lls = np.asarray(loglikelihoods, dtype=np.float64)
    if lls.shape != (len(request.choice_texts),):
        raise RecordsError(
            f"question {request.id!r}: {lls.size} log-likelihoods for {len(request.choice_texts)} choices"
        )
    lengths = choice_lengths(request)
    return QuestionRecord(
        id=request.id,
        gold=request.gold,
        pred=int(np.argmax(lls)),
        pred_norm=int(np.argmax(lls / np.asarray(lengths, dtype=np.float64))),
        loglikelihoods=tuple(float(x) for x in lls),
        lengths=lengths,
    )


@dataclass(frozen=True)
class QuestionSet:
    """The records of one evaluation: one model, one round, one question set."""

    round: int
    role: str
    client: int | None
    set: str
    """Which question set: "eval" (the run's evaluation set) or an algorithm's own (CrossLM's "heldout")."""
    questions: tuple[QuestionRecord, ...]

    @property
    def file_name(self) -> str:
        """`round-0002-slm.jsonl`, `round-0000-slm-client-3.jsonl`, `round-0002-llm-heldout.jsonl`."""
        parts = [f"round-{self.round:04d}", self.role]
        if self.client is not None:
            parts.append(f"client-{self.client}")
        if self.set != "eval":
            parts.append(self.set)
        return "-".join(parts) + ".jsonl"

    @property
    def acc(self) -> float:
        return float(np.mean([q.correct for q in self.questions])) if self.questions else float("nan")

    @property
    def acc_norm(self) -> float:
        return float(np.mean([q.correct_norm for q in self.questions])) if self.questions else float("nan")

    @classmethod
    def from_loglikelihoods(
        cls,
        rnd: int,
        role: str,
        client: int | None,
        requests: Sequence[MCRequest],
        loglikelihoods: Sequence[Sequence[float]],
        set_name: str = "eval",
    ) -> QuestionSet:
        """Records of `requests` from each question's per-choice log-likelihoods."""
        if len(loglikelihoods) != len(requests):
            raise RecordsError(f"{len(loglikelihoods)} scored questions for {len(requests)} requests")
        questions = tuple(question_record(r, lls) for r, lls in zip(requests, loglikelihoods, strict=True))
        return cls(rnd, role, client, set_name, questions)


def to_wire(loglikelihoods: Sequence[Sequence[float]]) -> dict[str, np.ndarray]:
    """A client's per-choice log-likelihoods as one reply array (question by question, flat)."""
    flat = [float(x) for lls in loglikelihoods for x in lls]
    return {WIRE_KEY: np.asarray(flat, dtype=np.float64)}


def from_wire(
    arrays: Mapping[str, np.ndarray], requests: Sequence[MCRequest], client: int
) -> list[list[float]]:
    """Inverse of `to_wire`, split by the requests' choice counts (the server knows the questions)."""
    if WIRE_KEY not in arrays:
        raise RecordsError(f"client {client}'s evaluation reply holds no {WIRE_KEY!r}")
    flat = np.asarray(arrays[WIRE_KEY], dtype=np.float64).ravel()
    counts = [len(r.choice_texts) for r in requests]
    if flat.size != sum(counts):
        raise RecordsError(
            f"client {client} returned {flat.size} log-likelihoods for {sum(counts)} choices of "
            f"{len(requests)} questions"
        )
    bounds = np.cumsum([0, *counts])
    return [flat[a:b].tolist() for a, b in itertools.pairwise(bounds)]


def _line(qset: QuestionSet, question: QuestionRecord) -> str:
    line: dict[str, Any] = {"round": qset.round, "role": qset.role, "client": qset.client, "set": qset.set}
    data = asdict(question)
    data["loglikelihoods"] = list(question.loglikelihoods)
    data["lengths"] = list(question.lengths)
    line.update(data)
    return json.dumps(line)


def write_question_sets(run_dir: Path, sets: Iterable[QuestionSet]) -> list[Path]:
    """Write each set to `run_dir/questions/<file_name>` (atomically: temp file, then rename)."""
    return [_write_lines(run_dir, qset.file_name, (_line(qset, q) for q in qset.questions)) for qset in sets]


def _write_lines(run_dir: Path, file_name: str, lines: Iterable[str]) -> Path:
    """`run_dir/questions/<file_name>`, one line each, atomically (temp file, then rename)."""
    folder = run_dir / QUESTIONS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)
    return path


_FIELDS = ("round", "role", "client", "set", "id", "gold", "pred", "pred_norm", "loglikelihoods", "lengths")


def read_question_set(path: Path) -> QuestionSet:
    """One records file back as a `QuestionSet`; a malformed line is an error naming file and line."""

    def question(line: dict[str, Any]) -> QuestionRecord:
        return QuestionRecord(
            id=str(line["id"]),
            gold=int(line["gold"]),
            pred=int(line["pred"]),
            pred_norm=int(line["pred_norm"]),
            loglikelihoods=tuple(float(x) for x in line["loglikelihoods"]),
            lengths=tuple(int(x) for x in line["lengths"]),
        )

    header, questions = _read_lines(path, _FIELDS, question, "a question record")
    if header is None:
        raise RecordsError(f"{path}: no question records")
    return QuestionSet(*header, questions=tuple(questions))


_Header = tuple[int, str, int | None, str]
_Record = TypeVar("_Record")


def _read_lines(
    path: Path, fields: Sequence[str], parse: Callable[[dict[str, Any]], _Record], what: str
) -> tuple[_Header | None, list[_Record]]:
    """Every record of a records file, parsed, and the round/role/client/set all its lines share
    (None for a file without records); a malformed or foreign line is an error naming file and line."""
    items = []
    header: _Header | None = None
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            missing = [name for name in fields if name not in line]
            if missing:
                raise KeyError(", ".join(missing))
            this = (int(line["round"]), str(line["role"]), line["client"], str(line["set"]))
            item = parse(line)
        except (ValueError, KeyError, TypeError) as exc:
            raise RecordsError(f"{path}, line {number}: not {what} ({exc})") from exc
        if header is None:
            header = this
        elif this != header:
            raise RecordsError(
                f"{path}, line {number}: round/role/client/set {this} differ from line 1's {header}"
            )
        items.append(item)
    return header, items


def _kind(path: Path) -> str:
    """ "generation" for a file of generated answers' records, else "multiple_choice"."""
    with path.open(encoding="utf-8") as handle:
        first = handle.readline()
    try:
        return "generation" if "prediction" in json.loads(first) else "multiple_choice"
    except (ValueError, TypeError):
        return "multiple_choice"  # read_question_set names the bad line


def read_question_sets(run_dir: Path) -> list[QuestionSet]:
    """Every multiple-choice records file of a run folder, in file-name order (round, then role
    and client); `read_generation_sets` reads those of generated answers."""
    folder = run_dir / QUESTIONS_DIR
    if not folder.is_dir():
        return []
    return [read_question_set(p) for p in sorted(folder.glob("*.jsonl")) if _kind(p) == "multiple_choice"]


# ---------------------------------------------------------------------------------------------
# Generated answers

GENERATION_METRICS = ("exact_match", "f1", "rouge_l")
"""What each generated answer is scored with (`fedcollm.evaluation.text_metrics`)."""
SCORES_WIRE_KEY = "questions.scores"
"""The reply array in which a client returns its per-example scores (examples x metrics, float64)."""


@dataclass(frozen=True)
class GeneratedRecord:
    """One example as one model answered it: its answer (empty where a client scored it on its own
    node and sent the scores only), the references, and the answer's scores."""

    id: str
    prediction: str
    references: tuple[str, ...]
    exact_match: float
    f1: float
    rouge_l: float

    def score(self, metric: str) -> float:
        return float(getattr(self, metric))


@dataclass(frozen=True)
class GenerationSet:
    """The records of one evaluation by generated answers (as `QuestionSet` for multiple choice).

    One JSON line per example, in evaluation order:

        {"round": 2, "role": "slm", "client": null, "set": "eval", "id": "nq_open-17",
         "prediction": "1947", "references": ["1947", "in 1947"],
         "exact_match": 1.0, "f1": 1.0, "rouge_l": 1.0}
    """

    round: int
    role: str
    client: int | None
    set: str
    examples: tuple[GeneratedRecord, ...]

    @property
    def file_name(self) -> str:
        return QuestionSet(self.round, self.role, self.client, self.set, ()).file_name

    def mean(self, metric: str) -> float:
        return float(np.mean([e.score(metric) for e in self.examples])) if self.examples else float("nan")


def generation_scores_to_wire(records: Sequence[GeneratedRecord]) -> dict[str, np.ndarray]:
    """A client's per-example scores as one reply array (its answers stay on its node)."""
    values = [[r.score(m) for m in GENERATION_METRICS] for r in records]
    return {
        SCORES_WIRE_KEY: np.asarray(values, dtype=np.float64).reshape(len(records), len(GENERATION_METRICS))
    }


def generation_scores_from_wire(
    arrays: Mapping[str, np.ndarray], ids: Sequence[str], references: Sequence[Sequence[str]], client: int
) -> list[GeneratedRecord]:
    """Inverse of `generation_scores_to_wire` for the examples `ids` (the server knows them)."""
    if SCORES_WIRE_KEY not in arrays:
        raise RecordsError(f"client {client}'s evaluation reply holds no {SCORES_WIRE_KEY!r}")
    scores = np.asarray(arrays[SCORES_WIRE_KEY], dtype=np.float64)
    if scores.shape != (len(ids), len(GENERATION_METRICS)):
        raise RecordsError(
            f"client {client} returned scores of shape {scores.shape} for {len(ids)} examples "
            f"({len(GENERATION_METRICS)} metrics each)"
        )
    return [
        GeneratedRecord(i, "", tuple(refs), *(float(x) for x in row))
        for i, refs, row in zip(ids, references, scores, strict=True)
    ]


def _generation_line(gset: GenerationSet, record: GeneratedRecord) -> str:
    line: dict[str, Any] = {"round": gset.round, "role": gset.role, "client": gset.client, "set": gset.set}
    line.update(asdict(record))
    line["references"] = list(record.references)
    return json.dumps(line)


def write_records(run_dir: Path, sets: Iterable[QuestionSet | GenerationSet]) -> list[Path]:
    """Write each set, of either kind, to `run_dir/questions/<file_name>` (atomically)."""
    written = []
    for one in sets:
        if isinstance(one, QuestionSet):
            written += write_question_sets(run_dir, [one])
        else:
            written.append(
                _write_lines(run_dir, one.file_name, (_generation_line(one, r) for r in one.examples))
            )
    return written


_GENERATION_FIELDS = ("round", "role", "client", "set", "id", "prediction", "references", *GENERATION_METRICS)


def read_generation_set(path: Path) -> GenerationSet:
    """One file of generated answers' records back as a `GenerationSet` (errors name file and line)."""

    def record(line: dict[str, Any]) -> GeneratedRecord:
        return GeneratedRecord(
            str(line["id"]),
            str(line["prediction"]),
            tuple(str(r) for r in line["references"]),
            *(float(line[m]) for m in GENERATION_METRICS),
        )

    header, examples = _read_lines(path, _GENERATION_FIELDS, record, "a generated-answer record")
    if header is None:
        raise RecordsError(f"{path}: no records")
    return GenerationSet(*header, examples=tuple(examples))


def read_generation_sets(run_dir: Path) -> list[GenerationSet]:
    """Every file of generated answers' records of a run folder, in file-name order."""
    folder = run_dir / QUESTIONS_DIR
    if not folder.is_dir():
        return []
    return [read_generation_set(p) for p in sorted(folder.glob("*.jsonl")) if _kind(p) == "generation"]
