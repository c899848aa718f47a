"""Instruction and chat data: `{instruction, input?, output}` or `{messages: [...]}` records.

The two shapes the field's federated-LLM tools take (Alpaca-style instruction/input/output in
FederatedScope-LLM, OpenFedLLM and FATE-LLM; role/content message lists in TRL and FlowerTune),
read from JSONL, JSON, CSV, Parquet or a `datasets.save_to_disk` folder through `datasets`.
Every record becomes a conversation that ends with the assistant's response, the text a model
is trained to write (`fedcollm.lm.chat` renders it and puts the loss on the response only).
A bad record raises `DataError` naming the file, the row (1-based, as an editor shows a JSONL
line) and the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcollm.data.errors import DataError
from fedcollm.data.jsonl import scalar_fields
from fedcollm.data.tables import read_rows

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str
    content: str


@dataclass(frozen=True)
class InstructionExample:
    """A conversation whose last turn is the assistant's response (what training targets)."""

    id: str
    messages: tuple[Message, ...]
    fields: Mapping[str, str] = field(default_factory=dict)

    @property
    def prompt(self) -> tuple[Message, ...]:
        """Every turn before the response."""
        return self.messages[:-1]

    @property
    def response(self) -> str:
        return self.messages[-1].content


_INSTRUCTION_KEYS = frozenset({"id", "instruction", "input", "output"})
_CHAT_KEYS = frozenset({"id", "messages"})


def _text(record: Mapping[str, Any], key: str, where: str, *, required: bool) -> str | None:
    value = record.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise DataError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value


def _from_instruction(record: Mapping[str, Any], example_id: str, where: str) -> InstructionExample:
    instruction = _text(record, "instruction", where, required=True)
    extra = _text(record, "input", where, required=False)
    output = _text(record, "output", where, required=True)
    user = instruction if not extra else f"{instruction}\n\n{extra}"
    messages = (Message("user", str(user)), Message("assistant", str(output)))
    return InstructionExample(example_id, messages, scalar_fields(record, _INSTRUCTION_KEYS))


def _from_messages(record: Mapping[str, Any], example_id: str, where: str) -> InstructionExample:
    raw = record["messages"]
    if not isinstance(raw, Sequence) or isinstance(raw, str) or len(raw) < 2:
        raise DataError(f"{where}: field 'messages' must be a list of >= 2 turns, got {raw!r}")
    messages = []
    for turn, item in enumerate(raw):
        at = f"{where}: messages[{turn}]"
        if not isinstance(item, Mapping):
            raise DataError(f"{at} must be an object with 'role' and 'content', got {item!r}")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise DataError(f"{at}: field 'role' is {role!r}; one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{at}: field 'content' must be a string, got {content!r}")
        messages.append(Message(str(role), content))
    if messages[-1].role != "assistant" or not messages[-1].content.strip():
        raise DataError(f"{where}: the last turn of 'messages' must be a non-empty assistant response")
    if not any(m.role == "user" for m in messages[:-1]):
        raise DataError(f"{where}: 'messages' has no user turn before the response")
    return InstructionExample(example_id, tuple(messages), scalar_fields(record, _CHAT_KEYS))


def parse_instruction_record(record: Any, default_id: str, where: str) -> InstructionExample:
    """One record of either shape; `where` names it in errors (`file:row`)."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    example_id = record.get("id", default_id)
    example_id = str(example_id) if example_id is not None else default_id
    if record.get("messages") is not None:
        return _from_messages(record, example_id, where)
    if record.get("instruction") is not None or record.get("output") is not None:
        return _from_instruction(record, example_id, where)
    # a file mixing shapes reads with every column on every row, None where a record lacks it
    keys = ", ".join(sorted(str(k) for k, v in record.items() if v is not None)) or "none"
    raise DataError(
        f"{where}: neither an instruction record (instruction, input?, output) nor a chat record "
        f"(messages); its fields: {keys}"
    )


def read_instructions(path: str | Path, limit: int | None = None) -> list[InstructionExample]:
    """All (or the first `limit`) instruction or chat examples of a file or saved dataset."""
    path = Path(path)
    rows = read_rows(path)
    examples: list[InstructionExample] = []
    for row, record in enumerate(rows, start=1):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(parse_instruction_record(record, f"{path.stem}-{row}", f"{path}:{row}"))
    if not examples:
        raise DataError(f"data file {path} holds no examples")
    return examples
