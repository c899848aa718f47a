"""Broken inputs (tests/data/broken/) get a clear error naming the culprit, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcollm.config import ConfigError, build_config, load_config
from fedcollm.data import DataError, load_questions

BROKEN = Path(__file__).parent / "data" / "broken"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("missing_gold.jsonl", r"missing_gold\.jsonl:2.*gold"),
        ("truncated_line.jsonl", r"truncated_line\.jsonl:2"),
        ("gold_out_of_range.jsonl", r"gold_out_of_range\.jsonl:1.*gold"),
        ("one_choice.jsonl", r"one_choice\.jsonl:1.*choices"),
        ("question_not_text.jsonl", r"question_not_text\.jsonl:1.*question"),
    ],
)
def test_broken_data_files_name_file_line_and_field(name: str, expected: str) -> None:
    with pytest.raises(DataError, match=expected):
        load_questions("arc_easy", "train", BROKEN / name)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "misspelled_key.toml",
            r"(?s)misspelled_key\.toml.*federation\.round.*did you mean 'federation\.rounds'",
        ),
        ("wrong_type.toml", r"federation\.rounds"),
        ("out_of_range.toml", r"task\.aux_fraction"),
        ("unknown_algorithm.toml", r"unknown algorithm 'fedprox'"),
        ("not_toml.toml", r"not_toml\.toml: not valid TOML"),
        ("client_models_mismatch.toml", r"client_models names 3 models for num_clients=2"),
    ],
)
def test_broken_configs_name_the_file_and_key(name: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(BROKEN / name)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    records=st.lists(
        st.dictionaries(st.sampled_from(["question", "choices", "gold", "id", "x"]), json_values)
    )
)
def test_jsonl_loader_either_loads_or_names_the_line(tmp_path: Path, records: list[dict]) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    try:
        questions = load_questions("arc_easy", "train", path)
    except DataError as exc:
        assert "data.jsonl:" in str(exc)
    else:
        assert len(questions) == len(records)
        for q in questions:
            assert isinstance(q.question, str) and len(q.choices) >= 2 and 0 <= q.gold < len(q.choices)


sections = st.sampled_from(["federation", "train", "distill", "task", "eval", "slm", "nonsense"])
keys = st.sampled_from(
    ["rounds", "num_clients", "epochs", "batch_size", "lr", "limit", "name", "aux_fraction", "zzz"]
)


@settings(max_examples=200, deadline=None)
@given(data=st.dictionaries(sections, st.dictionaries(keys, json_values, max_size=3), max_size=3))
def test_config_loader_either_validates_or_raises_config_error(data: dict) -> None:
    try:
        build_config(data)
    except ConfigError as exc:
        assert str(exc).startswith("invalid configuration")
