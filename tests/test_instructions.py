"""Instruction and chat data: every accepted file format, every record shape, errors that name
file, row and field; rendering with the model's chat template (or a plain one) and a training
sequence whose loss-carrying tokens are exactly the response's."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from fedcollm.data import DataError
from fedcollm.data.instructions import InstructionExample, Message, read_instructions
from fedcollm.lm.chat import ALPACA_HEADER, encode_chat, render_chat
from fedcollm.lm.encoding import EncodingError, collate
from fedcollm.lm.loading import gguf_chat_template, load_tokenizer, resolve_model

RECORDS = [
    {"id": "a", "instruction": "Name a colour.", "input": "", "output": "Blue.", "topic": "art"},
    {"id": "b", "instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "topic": "maths"},
]


def _write_all_formats(folder: Path) -> dict[str, Path]:
    table = datasets.Dataset.from_list(RECORDS)
    paths = {
        "jsonl": folder / "d.jsonl",
        "csv": folder / "d.csv",
        "parquet": folder / "d.parquet",
        "saved": folder / "saved",
    }
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    table.to_csv(str(paths["csv"]), index=False)
    table.to_parquet(str(paths["parquet"]))
    table.save_to_disk(str(paths["saved"]))
    return paths


def test_every_format_reads_to_the_same_examples(tmp_path: Path) -> None:
    read = {kind: read_instructions(path) for kind, path in _write_all_formats(tmp_path).items()}
    first = read["jsonl"]
    assert [e.id for e in first] == ["a", "b"]
    assert first[0].messages == (Message("user", "Name a colour."), Message("assistant", "Blue."))
    assert first[1].messages[0] == Message("user", "Add the numbers.\n\n2 and 3")
    assert first[1].fields["topic"] == "maths"
    for kind, examples in read.items():
        assert [(e.id, e.messages) for e in examples] == [(e.id, e.messages) for e in first], kind


def test_chat_records_keep_their_turns_and_take_default_ids(tmp_path: Path) -> None:
    path = tmp_path / "chats.jsonl"
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ]
    }
    path.write_text(json.dumps(chat) + "\n")
    (example,) = read_instructions(path)
    assert example.id == "chats-1" and example.response == "Hello."
    assert [m.role for m in example.prompt] == ["system", "user"]


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        ({"instruction": "x"}, r"d.jsonl:2: field 'output' must be a non-empty string"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
            r":2: messages\[1\]: field 'role' is 'bot'",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            r":2: the last turn .* assistant",
        ),
        (
            {"question": "q", "answer": "a"},
            r":2: neither an instruction record .* its fields: answer, question",
        ),
    ],
)
def test_a_bad_record_names_file_row_and_field(
    tmp_path: Path, record: dict[str, object], pattern: str
) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=pattern):
        read_instructions(path)


def test_unreadable_sources_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_instructions(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(
        DataError, match=r"unknown format \.txt; use \.jsonl, \.jsonl\.gz, \.json, \.csv, \.parquet"
    ):
        read_instructions(tmp_path / "d.txt")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"holds several splits \(train\); point at one"):
        read_instructions(tmp_path / "dd")
    (tmp_path / "broken.jsonl").write_text('{"instruction": "x", ')
    with pytest.raises(DataError, match=r"broken\.jsonl cannot be read"):
        read_instructions(tmp_path / "broken.jsonl")


EXAMPLE = InstructionExample("e", (Message("user", "Name a colour."), Message("assistant", "Blue.")))


def test_the_instruct_models_gguf_chat_template_survives_conversion() -> None:
    from fedcollm.lm.loading import ALIASES

    template = gguf_chat_template(ALIASES["smollm2-135m"].gguf())
    assert template is not None and "<|im_start|>" in template
    assert load_tokenizer(resolve_model("smollm2-135m")).chat_template == template
    assert gguf_chat_template(ALIASES["gemma3-270m"].gguf()) is None


def test_a_chat_template_renders_and_only_the_response_carries_the_loss() -> None:
    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    encoded = encode_chat(tokenizer, EXAMPLE, add_bos=False)
    turns = [{"role": "user", "content": "Name a colour."}]
    prompt_ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "keys"):
        prompt_ids = prompt_ids["input_ids"]
    assert list(encoded.input_ids[: encoded.n_context]) == list(prompt_ids)
    assert tokenizer.decode(encoded.answer_ids) == "Blue.<|im_end|>\n"
    batch = collate([encoded], pad_id=0, device="cpu")
    assert batch.targets.tolist() == list(encoded.answer_ids)  # the loss sees the response only


def test_without_a_template_the_alpaca_prompt_is_used_with_bos_and_eos() -> None:
    tokenizer = load_tokenizer(resolve_model("gemma3-270m"))
    prompt, response = render_chat(tokenizer, EXAMPLE)
    assert prompt == f"{ALPACA_HEADER}### Instruction:\nName a colour.\n\n### Response:\n"
    assert response == "Blue." + tokenizer.eos_token
    encoded = encode_chat(tokenizer, EXAMPLE, add_bos=True)
    assert encoded.input_ids[0] == tokenizer.bos_token_id
    assert encoded.answer_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(encoded.answer_ids, skip_special_tokens=True) == "Blue."
    turns_prompt, turns_response = render_chat(tokenizer, EXAMPLE, plain="turns")
    assert turns_prompt == "User: Name a colour.\nAssistant:" and turns_response.startswith(" Blue.")


def test_a_long_prompt_is_cut_on_the_left_and_a_response_that_cannot_fit_is_refused() -> None:
    tokenizer = load_tokenizer(resolve_model("gemma3-270m"))
    long = InstructionExample("long", (Message("user", "word " * 200), Message("assistant", "Blue.")))
    whole = encode_chat(tokenizer, long, add_bos=True)
    cut = encode_chat(tokenizer, long, add_bos=True, max_length=40)
    assert len(cut.input_ids) == 40 and cut.answer_ids == whole.answer_ids
    assert cut.input_ids == whole.input_ids[-40:]
    with pytest.raises(EncodingError, match="does not fit max_length=2"):
        encode_chat(tokenizer, long, add_bos=True, max_length=2)
    with pytest.raises(EncodingError, match="one instruction"):
        render_chat(
            tokenizer, InstructionExample("m", (Message("assistant", "x"), Message("assistant", "y")))
        )
