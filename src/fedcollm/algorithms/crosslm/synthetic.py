"""Synthetic multiple-choice examples written by the server's LLM (CrossLM's data generator).

Four concerns, each a small function:
- prompting: a task description and a few demonstrations in one fixed block format
  (`format_block`), ending where the next example's question begins (`build_prompt`);
- generation: batched sampling with `model.generate` that stops each row at the end of its block;
- parsing: a strict grammar for one block (`parse_generation`) that never raises: a generation is
  either a valid `MCQuestion` or discarded with a status (malformed, truncated, duplicate, ...);
- transport and inspection: questions packed into byte arrays that travel in a `Payload` on
  every engine (`pack_questions`), and JSONL files of each round's generations.

The block format is the same for every task and independent of the task's evaluation prompt,
so the parser does not depend on it: clients render accepted questions in the task's own format.
"""

from __future__ import annotations

import itertools
import json
import re
import string
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from peft import PeftModel
from transformers import PreTrainedModel, StoppingCriteria, StoppingCriteriaList
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedcollm.data import MCQuestion
from fedcollm.lm.devices import model_device
from fedcollm.lm.encoding import Encoded, EncodingError, pad_id

LETTERS = string.ascii_uppercase
QUESTION_TAG = "Question:"
ANSWER_TAG = "Answer:"
BLOCK_SEPARATOR = "\n\n"
TERMINATORS = (BLOCK_SEPARATOR, "\n" + QUESTION_TAG)
"""A generated block ends at a blank line or where the model starts the next question."""
MAX_QUESTION_CHARS = 400
MAX_CHOICE_CHARS = 160

TASK_DESCRIPTIONS: dict[str, str] = {
    "commonsense_qa": (
        "The following are multiple-choice questions that test commonsense knowledge about everyday "
        "situations, people and objects. Each question has five answer choices, exactly one of which "
        "is correct; the letter of the correct choice follows 'Answer:'."
    ),
    "arc_easy": (
        "The following are multiple-choice grade-school science questions. Each question has answer "
        "choices labelled with letters, exactly one of which is correct; the letter of the correct "
        "choice follows 'Answer:'."
    ),
    "arc_challenge": (
        "The following are difficult multiple-choice grade-school science questions that need "
        "reasoning. Each question has answer choices labelled with letters, exactly one of which is "
        "correct; the letter of the correct choice follows 'Answer:'."
    ),
    "openbookqa": (
        "The following are multiple-choice questions about elementary science facts and how to apply "
        "them. Each question has four answer choices, exactly one of which is correct; the letter of "
        "the correct choice follows 'Answer:'."
    ),
}
"""Built-in generation instructions per task (`crosslm.task_description` overrides them)."""

GENERIC_DESCRIPTION = (
    "The following are multiple-choice questions. Each question has answer choices labelled with "
    "letters, exactly one of which is correct; the letter of the correct choice follows 'Answer:'."
)

# ---------------------------------------------------------------------------------------------
# Prompting


def task_description(task: str, override: str = "") -> str:
    """The instruction that heads a generation prompt for `task`."""
    return override.strip() or TASK_DESCRIPTIONS.get(task, GENERIC_DESCRIPTION)


def format_block(question: MCQuestion) -> str:
    """One example in the generation format: question, lettered choices, answer letter."""
    choices = "".join(f"\n{LETTERS[i]}. {text.strip()}" for i, text in enumerate(question.choices))
    return f"{QUESTION_TAG} {question.question.strip()}{choices}\n{ANSWER_TAG} {LETTERS[question.gold]}"


def build_prompt(description: str, demonstrations: Sequence[MCQuestion]) -> str:
    """Description, demonstrations, then the opening tag of the example the model is to write."""
    parts = [description.strip(), *(format_block(q) for q in demonstrations)]
    return BLOCK_SEPARATOR.join(parts) + BLOCK_SEPARATOR + QUESTION_TAG


def completion_of(question: MCQuestion) -> str:
    """What the model should write after `build_prompt`'s trailing tag for `question` (with the end)."""
    return format_block(question)[len(QUESTION_TAG) :] + BLOCK_SEPARATOR


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, *, add_bos: bool) -> list[int]:
    """The token ids generation conditions on for `prompt`: BOS where the model takes one
    (`LoadedModel.add_bos`), then the prompt's own encoding, whole. `generate_texts` and the
    write objective (`encode_written`) both encode prompts here, so they see the same tokens."""
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    return bos + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def encode_written(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, *, add_bos: bool
) -> Encoded:
    """The write objective's sequence: `prompt` exactly as generation saw it, then `completion`.

    The context is `encode_prompt(prompt)`, never cut. The target is the completion's tokens as
    they follow the prompt in the encoding of prompt+completion (lm-eval's split, `encode_pair`),
    where that encoding starts with the prompt's own; should a token merge across the boundary,
    the completion's own encoding instead, so the context stays the prompt generation saw.
    """
    context = encode_prompt(tokenizer, prompt, add_bos=add_bos)
    whole = encode_prompt(tokenizer, prompt + completion, add_bos=add_bos)
    if whole[: len(context)] == context:
        target = whole[len(context) :]
    else:
        target = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if not target:
        raise EncodingError(f"completion {completion!r} encodes to no tokens after its prompt")
    return Encoded(tuple(int(t) for t in context + target), len(context))


# ---------------------------------------------------------------------------------------------
# Parsing

OK = "ok"
MALFORMED = "malformed"
TRUNCATED = "truncated"
DUPLICATE = "duplicate"
EVAL_OVERLAP = "eval_overlap"
STATUSES = (OK, MALFORMED, TRUNCATED, DUPLICATE, EVAL_OVERLAP)
"""Every status a generation can end with; all but `ok` are discards, counted per round."""

_QUESTION = re.compile(r"Question:[ \t]*(\S.*)")
_CHOICE = re.compile(r"([A-Z])\.[ \t]+(\S.*)")
_ANSWER = re.compile(r"Answer:[ \t]*([A-Z])")


@dataclass(frozen=True)
class Parsed:
    """The outcome of parsing one generation: an example if `status == "ok"`, else why not.

    `question` is the example: a multiple-choice question here, an instruction/response pair for
    tasks answered in free text (`fedcollm.algorithms.crosslm.kinds`)."""

    status: str
    reason: str = ""
    question: Any = None

    @property
    def ok(self) -> bool:
        return self.status == OK


def _cut_block(text: str, terminators: Sequence[str] = TERMINATORS) -> tuple[str, bool]:
    """The first block of `text` and whether it was terminated (else it may be cut off)."""
    ends = [i for i in (text.find(t) for t in terminators) if i >= 0]
    if ends:
        return text[: min(ends)], True
    return text, False


def parse_generation(
    generated: str,
    *,
    choice_counts: Collection[int],
    finished: bool,
    question_id: str = "synthetic",
) -> Parsed:
    """Parse what the model wrote after the prompt's trailing `Question:` tag; never raises.

    The block must be exactly: the question on the tag's line, one line per choice lettered
    A, B, ... in order (as many as some demonstration had: `choice_counts`), then
    `Answer: <letter of one of the choices>`, and nothing else. It ends at a blank line or at
    the start of a next question; if neither occurs and the model did not stop by itself
    (`finished` False: the token budget ran out), the block is `truncated`. Choices must be
    distinct; question and choices are bounded in length.
    """
    block, terminated = _cut_block(QUESTION_TAG + generated)
    if not terminated and not finished:
        return Parsed(TRUNCATED, "no end of the example within the token budget")
    lines = [line.rstrip() for line in block.strip("\n").split("\n")]
    head = _QUESTION.fullmatch(lines[0])
    if head is None:
        return Parsed(MALFORMED, "no question text on the 'Question:' line")
    question = head.group(1).strip()
    if len(question) > MAX_QUESTION_CHARS:
        return Parsed(MALFORMED, f"question longer than {MAX_QUESTION_CHARS} characters")
    choices: list[str] = []
    rest = lines[1:]
    while rest and (match := _CHOICE.fullmatch(rest[0])) is not None:
        expected = LETTERS[len(choices)]
        if match.group(1) != expected:
            return Parsed(MALFORMED, f"choice {match.group(1)} where {expected} was expected")
        choices.append(match.group(2).strip())
        rest = rest[1:]
    if len(choices) not in choice_counts:
        allowed = ", ".join(str(n) for n in sorted(choice_counts))
        return Parsed(MALFORMED, f"{len(choices)} choices; the task has {allowed}")
    if any(len(c) > MAX_CHOICE_CHARS for c in choices):
        return Parsed(MALFORMED, f"a choice longer than {MAX_CHOICE_CHARS} characters")
    if len({normalised(c) for c in choices}) != len(choices):
        return Parsed(MALFORMED, "two choices say the same")
    if not rest:
        return Parsed(MALFORMED, "no 'Answer:' line")
    answer = _ANSWER.fullmatch(rest[0])
    if answer is None:
        return Parsed(MALFORMED, f"expected 'Answer: <letter>', got {rest[0][:40]!r}")
    if len(rest) > 1:
        return Parsed(MALFORMED, "text after the answer line")
    gold = LETTERS.index(answer.group(1))
    if gold >= len(choices):
        return Parsed(MALFORMED, f"answer {answer.group(1)} is not one of the {len(choices)} choices")
    return Parsed(OK, "", MCQuestion(question_id, question, tuple(choices), gold))


def normalised(text: str) -> str:
    """Normalised text for duplicate checks: case, punctuation and spacing ignored."""
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


def question_key(question: MCQuestion) -> str:
    return normalised(question.question)


def mark_duplicates(
    parsed: Sequence[Parsed],
    known: Iterable[str],
    evaluation: Iterable[str],
    key: Callable[[Any], str] = question_key,
) -> list[Parsed]:
    """Discard valid generations that repeat a known example, an earlier one, or an eval question.

    `known`: the keys (`key`) of examples the generator was shown or trained on (the auxiliary
    set): copying them adds nothing. `evaluation`: the evaluation set's keys; a question of it
    would leak the test into training.
    """
    seen = set(known)
    held_out = set(evaluation)
    out: list[Parsed] = []
    for item in parsed:
        if item.ok and item.question is not None:
            example_key = key(item.question)
            if example_key in held_out:
                item = Parsed(EVAL_OVERLAP, "same question as one of the evaluation set", item.question)
            elif example_key in seen:
                item = Parsed(DUPLICATE, "repeats a demonstration or an earlier candidate", item.question)
            seen.add(example_key)
        out.append(item)
    return out


def shuffle_choices(question: MCQuestion, rng: np.random.Generator) -> MCQuestion:
    """The same question with its choices in a random order (the gold index follows its text)."""
    order = rng.permutation(len(question.choices))
    choices = tuple(question.choices[i] for i in order)
    return replace(question, choices=choices, gold=int(np.flatnonzero(order == question.gold)[0]))


# ---------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class SamplingSettings:
    """How the LLM samples (from `crosslm` in the config)."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 96
    batch_size: int = 8


@dataclass(frozen=True)
class Generation:
    """One decoded continuation; `finished` if the model ended it (block end or end-of-sequence)."""

    text: str
    finished: bool


class _BlockEnd(StoppingCriteria):
    """Stops each row once its generated text contains a block terminator.

    Cheaper than `stop_strings`, whose set-up scans the whole vocabulary (262k tokens for Gemma).
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_length: int, terminators: Sequence[str]
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.terminators = tuple(terminators)

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        done = [any(t in text for t in self.terminators) for text in texts]
        return cast(torch.BoolTensor, torch.tensor(done, dtype=torch.bool, device=input_ids.device))


def _eos_ids(model: PeftModel | PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


@torch.no_grad()
def generate_texts(
    model: PeftModel | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    add_bos: bool,
    settings: SamplingSettings,
    seed: int,
    on_batch: Callable[[int, int], None] | None = None,
    terminators: Sequence[str] = TERMINATORS,
) -> list[Generation]:
    """Sample one continuation per prompt, batched with left padding; seeded, so reproducible.
    Each row stops at the end of its block (`terminators`) or at end of sequence."""
    was_training = model.training
    model.eval()
    pad = pad_id(tokenizer)
    eos = _eos_ids(model, tokenizer)
    torch.manual_seed(seed)
    device = model_device(model)
    out: list[Generation] = []
    total = -(-len(prompts) // settings.batch_size)
    for b, start in enumerate(range(0, len(prompts), settings.batch_size)):
        encoded = [
            encode_prompt(tokenizer, prompt, add_bos=add_bos)
            for prompt in prompts[start : start + settings.batch_size]
        ]
        length = max(len(ids) for ids in encoded)
        input_ids = torch.tensor(
            [[pad] * (length - len(ids)) + ids for ids in encoded], dtype=torch.long, device=device
        )
        attention = torch.tensor(
            [[0] * (length - len(ids)) + [1] * len(ids) for ids in encoded], dtype=torch.long, device=device
        )
        # peft forwards `generate` to the base model, and transformers types it with a self type
        # of its own; neither spelling type-checks, so the call is left untyped.
        generator: Any = model
        sequences = generator.generate(
            input_ids=input_ids,
            attention_mask=attention,
            do_sample=True,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k or None,
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([_BlockEnd(tokenizer, length, terminators)]),
        )
        for row in sequences[:, length:].tolist():
            hit_eos = any(t in eos for t in row)
            if hit_eos:
                row = row[: next(i for i, t in enumerate(row) if t in eos)]
            text = str(tokenizer.decode(row, skip_special_tokens=True))
            out.append(Generation(text, finished=hit_eos or _cut_block(text, terminators)[1]))
        if on_batch is not None:
            on_batch(b + 1, total)
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------
# Transport: questions as arrays (they must travel in a Payload over every engine)


def pack_questions(questions: Sequence[MCQuestion], name: str) -> dict[str, np.ndarray]:
    """`name.bytes` (UTF-8 JSON of every question, uint8) and `name.offsets` (int64, len n+1)."""
    blobs = [
        json.dumps(
            {"id": q.id, "question": q.question, "choices": list(q.choices), "gold": q.gold},
            ensure_ascii=False,
        ).encode("utf-8")
        for q in questions
    ]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs], dtype=np.int64)
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8).copy()
    return {f"{name}.bytes": data, f"{name}.offsets": offsets}


def unpack_questions(arrays: Mapping[str, np.ndarray], name: str) -> list[MCQuestion]:
    """The questions `pack_questions` packed under `name` (none if absent)."""
    if f"{name}.offsets" not in arrays:
        return []
    data = np.asarray(arrays[f"{name}.bytes"], dtype=np.uint8).tobytes()
    offsets = np.asarray(arrays[f"{name}.offsets"], dtype=np.int64)
    out = []
    for start, end in itertools.pairwise(offsets):
        item = json.loads(data[int(start) : int(end)].decode("utf-8"))
        out.append(MCQuestion(str(item["id"]), item["question"], tuple(item["choices"]), int(item["gold"])))
    return out


# ---------------------------------------------------------------------------------------------
# Inspection


@dataclass
class GeneratedRecord:
    """One line of a round's JSONL: a generation, how it parsed, and (if valid) its feedback.

    `question` is the parsed example (a multiple-choice question, or an instruction/response
    pair); `example` its JSON fields, as the run's kind of example writes them."""

    round: int
    index: int
    status: str
    reason: str
    raw: str
    demonstrations: list[str] = field(default_factory=list)
    question: Any = None
    example: dict[str, Any] | None = None
    score: float | None = None
    weight: float | None = None
    selected: bool = False

    def as_dict(self) -> dict[str, Any]:
        fields = {k: v for k, v in (self.example or {}).items() if k != "id"}
        return {
            "round": self.round,
            "index": self.index,
            "status": self.status,
            "reason": self.reason,
            **fields,
            "score": self.score,
            "weight": self.weight,
            "selected": self.selected,
            "demonstrations": self.demonstrations,
            "raw": self.raw,
        }


def write_jsonl(path: Path, records: Iterable[GeneratedRecord]) -> None:
    """Write one JSON object per record (UTF-8, one line each)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record.as_dict(), ensure_ascii=False) + "\n")
