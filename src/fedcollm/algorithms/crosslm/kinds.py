"""What CrossLM's LLM writes and its SLMs score, by the kind of the run's task.

- `MultipleChoiceKind` (multiple-choice tasks): the LLM writes questions with lettered choices and
  the answer letter (`fedcollm.algorithms.crosslm.synthetic`); an SLM's score of a candidate is its
  probability of the labelled choice among the choices, against a chance of 1/choices.
- `PairKind` (tasks answered in free text: short-answer QA, instructions): the LLM writes
  instruction/response pairs; an SLM's score of a candidate is its likelihood of the response
  given the instruction, per token (the geometric mean of its token probabilities, in (0, 1]),
  against a chance of 0. A pair becomes the task's own training item: a short-answer question in
  lm-eval's prompt, or a conversation rendered with each model's chat template.

Both write one block per example in a fixed text format (demonstrations, then the opening tag the
model continues from), parse a generation strictly and never raise, and travel as byte arrays.
"""

from __future__ import annotations

import itertools
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcollm.algorithms.crosslm import synthetic
from fedcollm.algorithms.crosslm.synthetic import (
    BLOCK_SEPARATOR,
    LETTERS,
    MALFORMED,
    OK,
    TRUNCATED,
    Parsed,
)
from fedcollm.config import ExperimentConfig
from fedcollm.data import MCQuestion, QAExample, render
from fedcollm.data.families import INSTRUCTIONS, Record, TaskFamily
from fedcollm.data.generative import TrainItem
from fedcollm.data.instructions import InstructionExample, Message
from fedcollm.evaluation.multiple_choice import encode_requests, sequence_loglikelihoods
from fedcollm.lm.models import LoadedModel


@dataclass(frozen=True)
class WrittenPair:
    """An instruction (a question) and its response (answer), as the LLM wrote them."""

    id: str
    prompt: str
    response: str


Example = MCQuestion | WrittenPair


def choice_probabilities(
    lm: LoadedModel,
    questions: Sequence[MCQuestion],
    *,
    task: str,
    fmt: str,
    max_length: int,
    batch_size: int,
) -> np.ndarray:
    """For each question, the model's probability of its labelled choice among its choices.

    The softmax over the choices' summed continuation log-likelihoods (the quantity `acc` takes
    the argmax of), rendered in the task's own prompt format.
    """
    if not questions:
        return np.zeros(0, dtype=np.float64)
    requests = [render(task, q, fmt) for q in questions]
    encoded = encode_requests(lm.tokenizer, requests, add_bos=lm.add_bos, max_length=max_length)
    lls = sequence_loglikelihoods(lm.model, encoded.sequences, lm.pad_id, batch_size)
    question_of = np.asarray(encoded.question_of)
    out = np.zeros(len(questions), dtype=np.float64)
    for i, q in enumerate(questions):
        ll = lls[question_of == i]
        p = np.exp(ll - ll.max())
        out[i] = p[q.gold] / p.sum()
    return out


def response_likelihoods(
    lm: LoadedModel, items: Sequence[TrainItem], *, max_length: int, batch_size: int
) -> np.ndarray:
    """For each item, the model's per-token likelihood of its target given its context:
    exp(mean log-probability of the target tokens), in (0, 1]."""
    if not items:
        return np.zeros(0, dtype=np.float64)
    encoded = lm.encode_sft(items, max_length)
    lls = sequence_loglikelihoods(lm.model, encoded, lm.pad_id, batch_size)
    lengths = np.asarray([e.n_target for e in encoded], dtype=np.float64)
    return np.exp(np.asarray(lls, dtype=np.float64) / lengths)


class SyntheticKind(ABC):
    """How one kind of example is prompted for, parsed, moved, trained on and scored."""

    opening_tag: str
    terminators: tuple[str, ...]

    def __init__(self, config: ExperimentConfig, family: TaskFamily) -> None:
        self.config = config
        self.family = family

    @abstractmethod
    def demonstrations(self, records: Sequence[Record]) -> list[Example]:
        """The auxiliary set's records as examples of this kind (the prompts' demonstrations)."""

    @abstractmethod
    def block(self, example: Example) -> str:
        """One example in the generation format, starting with `opening_tag`."""

    @abstractmethod
    def parse(
        self, generated: str, *, finished: bool, example_id: str, demonstrations: Sequence[Example]
    ) -> Parsed:
        """What the model wrote after the prompt's opening tag: a valid example or a discard."""

    @abstractmethod
    def key(self, example: Example) -> str:
        """What two examples share when one repeats the other."""

    @abstractmethod
    def train_items(self, examples: Sequence[Example]) -> list[TrainItem]:
        """The examples as the task's own training items."""

    @abstractmethod
    def scores(self, lm: LoadedModel, examples: Sequence[Example]) -> np.ndarray:
        """The SLM's score of each example, in [0, 1]."""

    @abstractmethod
    def chance(self, examples: Sequence[Example]) -> np.ndarray:
        """What a score of no knowledge is, per example."""

    @abstractmethod
    def to_dict(self, example: Example) -> dict[str, Any]:
        """The example as JSON (messages and the round's JSONL files)."""

    @abstractmethod
    def from_dict(self, item: Mapping[str, Any]) -> Example:
        """Inverse of `to_dict`."""

    @abstractmethod
    def default_description(self) -> str:
        """The generation prompt's instruction when `crosslm.task_description` is empty."""

    def finalize(self, example: Example, rng: np.random.Generator) -> Example:
        """A parsed example as it becomes a candidate (default: as parsed)."""
        return example

    def description(self) -> str:
        return self.config.crosslm.task_description.strip() or self.default_description()

    def build_prompt(self, demonstrations: Sequence[Example]) -> str:
        """Description, demonstrations, then the opening tag of the example the model is to write."""
        parts = [self.description(), *(self.block(e) for e in demonstrations)]
        return BLOCK_SEPARATOR.join(parts) + BLOCK_SEPARATOR + self.opening_tag

    def completion(self, example: Example) -> str:
        """What the model should write after the prompt's opening tag for `example` (with the end)."""
        return self.block(example)[len(self.opening_tag) :] + BLOCK_SEPARATOR

    def mark_duplicates(
        self, parsed: Sequence[Parsed], known: Iterable[Example], evaluation: Iterable[str]
    ) -> list[Parsed]:
        """Discard valid generations that repeat a known example or an earlier one, or ask an
        evaluation question (`evaluation`: their keys): copying adds nothing; the evaluation set
        would leak into training."""
        return synthetic.mark_duplicates(parsed, map(self.key, known), evaluation, key=self.key)

    def pack(self, examples: Sequence[Example], name: str) -> dict[str, np.ndarray]:
        """`name.bytes` (UTF-8 JSON of every example, uint8) and `name.offsets` (int64, len n+1)."""
        blobs = [json.dumps(self.to_dict(e), ensure_ascii=False).encode("utf-8") for e in examples]
        offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        return {
            f"{name}.bytes": np.frombuffer(b"".join(blobs), dtype=np.uint8).copy(),
            f"{name}.offsets": offsets,
        }

    def unpack(self, arrays: Mapping[str, np.ndarray], name: str) -> list[Example]:
        """The examples `pack` packed under `name` (none if absent)."""
        if f"{name}.offsets" not in arrays:
            return []
        data = np.asarray(arrays[f"{name}.bytes"], dtype=np.uint8).tobytes()
        offsets = np.asarray(arrays[f"{name}.offsets"], dtype=np.int64)
        return [
            self.from_dict(json.loads(data[int(a) : int(b)].decode("utf-8")))
            for a, b in itertools.pairwise(offsets)
        ]


class MultipleChoiceKind(SyntheticKind):
    opening_tag = synthetic.QUESTION_TAG
    terminators = synthetic.TERMINATORS

    def demonstrations(self, records: Sequence[Record]) -> list[Example]:
        return [r for r in records if isinstance(r, MCQuestion)]

    def block(self, example: Example) -> str:
        return synthetic.format_block(_question(example))

    def parse(
        self, generated: str, *, finished: bool, example_id: str, demonstrations: Sequence[Example]
    ) -> Parsed:
        counts: Collection[int] = {len(_question(d).choices) for d in demonstrations} or {4}
        return synthetic.parse_generation(
            generated, choice_counts=counts, finished=finished, question_id=example_id
        )

    def key(self, example: Example) -> str:
        return synthetic.question_key(_question(example))

    def train_items(self, examples: Sequence[Example]) -> list[TrainItem]:
        task = self.config.task
        return [render(task.name, _question(e), task.format) for e in examples]

    def scores(self, lm: LoadedModel, examples: Sequence[Example]) -> np.ndarray:
        config = self.config
        return choice_probabilities(
            lm,
            [_question(e) for e in examples],
            task=config.task.name,
            fmt=config.task.format,
            max_length=config.train.max_length,
            batch_size=config.eval.batch_size,
        )

    def chance(self, examples: Sequence[Example]) -> np.ndarray:
        return 1.0 / np.asarray([len(_question(e).choices) for e in examples], dtype=np.float64)

    def finalize(self, example: Example, rng: np.random.Generator) -> Example:
        if not self.config.crosslm.shuffle_choices:
            return example
        return synthetic.shuffle_choices(_question(example), rng)

    def to_dict(self, example: Example) -> dict[str, Any]:
        q = _question(example)
        return {
            "id": q.id,
            "question": q.question,
            "choices": list(q.choices),
            "gold": q.gold,
            "answer": LETTERS[q.gold],
        }

    def from_dict(self, item: Mapping[str, Any]) -> Example:
        return MCQuestion(str(item["id"]), item["question"], tuple(item["choices"]), int(item["gold"]))

    def default_description(self) -> str:
        return synthetic.task_description(self.config.task.name)


INSTRUCTION_TAG = "Instruction:"
RESPONSE_TAG = "Response:"
MAX_PROMPT_CHARS = 600
MAX_RESPONSE_CHARS = 800
MAX_SHORT_ANSWER_CHARS = 100

PAIR_DESCRIPTIONS: dict[str, str] = {
    "nq_open": "The following are questions people asked a search engine, each with a short factual "
    "answer (a name, a date, a number or a few words).",
    "trivia_qa": "The following are trivia questions, each with a short factual answer (a name, a "
    "place, a date or a few words).",
}
GENERIC_PAIR_DESCRIPTION = (
    "The following are instructions, each followed by a response that completes it helpfully and correctly."
)

_RESPONSE_LINE = re.compile(r"\n" + RESPONSE_TAG + r"[ \t]*")


class PairKind(SyntheticKind):
    opening_tag = INSTRUCTION_TAG
    terminators = (BLOCK_SEPARATOR, "\n" + INSTRUCTION_TAG)

    def demonstrations(self, records: Sequence[Record]) -> list[Example]:
        out: list[Example] = []
        for r in records:
            if isinstance(r, QAExample):
                out.append(WrittenPair(r.id, r.question, r.answers[0]))
            elif isinstance(r, InstructionExample):
                users = [m.content for m in r.prompt if m.role == "user"]
                out.append(WrittenPair(r.id, users[-1] if users else "", r.response))
        return [p for p in out if isinstance(p, WrittenPair) and p.prompt.strip()]

    def block(self, example: Example) -> str:
        pair = _pair(example)
        return f"{INSTRUCTION_TAG} {pair.prompt.strip()}\n{RESPONSE_TAG} {pair.response.strip()}"

    def parse(
        self, generated: str, *, finished: bool, example_id: str, demonstrations: Sequence[Example]
    ) -> Parsed:
        text = INSTRUCTION_TAG + generated
        ends = [i for i in (text.find(t) for t in self.terminators) if i >= 0]
        if not ends and not finished:
            return Parsed(TRUNCATED, "no end of the example within the token budget")
        block = text[: min(ends)] if ends else text
        parts = _RESPONSE_LINE.split(block[len(INSTRUCTION_TAG) :], maxsplit=1)
        if len(parts) != 2:
            return Parsed(MALFORMED, f"no '{RESPONSE_TAG}' line")
        prompt, response = parts[0].strip(), parts[1].strip()
        if not prompt:
            return Parsed(MALFORMED, f"no instruction text on the '{INSTRUCTION_TAG}' line")
        if not response:
            return Parsed(MALFORMED, "an empty response")
        if len(prompt) > MAX_PROMPT_CHARS or len(response) > MAX_RESPONSE_CHARS:
            return Parsed(MALFORMED, f"longer than {MAX_PROMPT_CHARS} / {MAX_RESPONSE_CHARS} characters")
        if self._short_answers and ("\n" in response or len(response) > MAX_SHORT_ANSWER_CHARS):
            return Parsed(
                MALFORMED, f"not a short answer (one line, at most {MAX_SHORT_ANSWER_CHARS} characters)"
            )
        return Parsed(OK, "", WrittenPair(example_id, prompt, response))

    @property
    def _short_answers(self) -> bool:
        """Short-answer QA (not instructions): a response is one short line."""
        return self.config.task.name != INSTRUCTIONS

    def key(self, example: Example) -> str:
        return synthetic.normalised(_pair(example).prompt)

    def train_items(self, examples: Sequence[Example]) -> list[TrainItem]:
        fmt = self.config.task.format
        return [self.family.train_item(self._record(_pair(e)), fmt) for e in examples]

    def _record(self, pair: WrittenPair) -> Record:
        if self.config.task.name == INSTRUCTIONS:
            return InstructionExample(
                pair.id, (Message("user", pair.prompt), Message("assistant", pair.response))
            )
        return QAExample(pair.id, pair.prompt, (pair.response,))

    def scores(self, lm: LoadedModel, examples: Sequence[Example]) -> np.ndarray:
        return response_likelihoods(
            lm,
            self.train_items(examples),
            max_length=self.config.train.max_length,
            batch_size=self.config.eval.batch_size,
        )

    def chance(self, examples: Sequence[Example]) -> np.ndarray:
        return np.zeros(len(examples), dtype=np.float64)

    def to_dict(self, example: Example) -> dict[str, Any]:
        pair = _pair(example)
        return {"id": pair.id, "instruction": pair.prompt, "response": pair.response}

    def from_dict(self, item: Mapping[str, Any]) -> Example:
        return WrittenPair(str(item["id"]), str(item["instruction"]), str(item["response"]))

    def default_description(self) -> str:
        return PAIR_DESCRIPTIONS.get(self.config.task.name, GENERIC_PAIR_DESCRIPTION)


def _question(example: Example) -> MCQuestion:
    if not isinstance(example, MCQuestion):
        raise TypeError(f"expected a multiple-choice question, got {type(example).__name__}")
    return example


def _pair(example: Example) -> WrittenPair:
    if not isinstance(example, WrittenPair):
        raise TypeError(f"expected an instruction/response pair, got {type(example).__name__}")
    return example


def synthetic_kind(config: ExperimentConfig, family: TaskFamily) -> SyntheticKind:
    """The kind of example CrossLM writes for the run's task."""
    return (
        MultipleChoiceKind(config, family) if family.kind == "multiple_choice" else PairKind(config, family)
    )
