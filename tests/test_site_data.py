"""Each client's own data file (`task.client_source = "files"`): every accepted format reads to the
same questions, a file that does not fit is named by file, line and field, and a run trains each
client on its own file, leaving out a site whose file does not fit only if
`robustness.min_clients` allows (on the embedded engine here; `test_site_data_flower.py` runs the
same on Flower with three SuperNodes)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from fedcollm.config import ConfigError, build_config
from fedcollm.data import DataError
from fedcollm.data.errors import without_values
from fedcollm.data.question_files import read_question_file
from fedcollm.engines import run_experiment
from fedcollm.errors import RoundError
from fedcollm.parties.data import ExperimentData
from tests.helpers import ALGORITHM_CONFIGS, TinyModels, read_metrics

RECORDS = [
    {
        "id": "a1",
        "question": "Which gas do plants absorb?",
        "choices": ["oxygen", "carbon dioxide"],
        "gold": 1,
    },
    {
        "id": "a2",
        "question": "What melts ice?",
        "choices": ["heat", "cold", "dark"],
        "gold": 0,
        "topic": "physics",
    },
    {
        "id": "a3",
        "question": "Which is a mammal?",
        "choices": ["shark", "whale"],
        "gold": 1,
        "topic": "biology",
    },
]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _site_files(folder: Path, sizes: list[int], tag: str = "site") -> list[Path]:
    """One JSONL question file per site, `sizes[k]` questions each, every question unique to its site."""
    files = []
    for k, size in enumerate(sizes):
        records = [
            {
                "id": f"{tag}{k}-{i}",
                "question": f"At site {k}, which number follows {i}?",
                "choices": [str(i + 1), str(i + 2), str(i + 3), str(i + 4)],
                "gold": 0,
            }
            for i in range(size)
        ]
        files.append(write_jsonl(folder / f"{tag}-{k}.jsonl", records))
    return files


# --------------------------------------------------------------------------------------------
# Formats


def _csv(path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "question", "choices", "gold", "topic"])
        writer.writeheader()
        for record in RECORDS:
            writer.writerow(
                {**record, "choices": json.dumps(record["choices"]), "topic": record.get("topic", "")}
            )
    return path


def _parquet(path: Path) -> Path:
    import datasets

    datasets.Dataset.from_list([{**r, "topic": r.get("topic")} for r in RECORDS]).to_parquet(str(path))
    return path


def _saved(path: Path) -> Path:
    import datasets

    datasets.Dataset.from_list([{**r, "topic": r.get("topic")} for r in RECORDS]).save_to_disk(str(path))
    return path


def _json(path: Path) -> Path:
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("name", "write"), [("q.csv", _csv), ("q.parquet", _parquet), ("saved", _saved), ("q.json", _json)]
)
def test_every_accepted_format_reads_to_the_questions_of_the_jsonl_file(
    tmp_path: Path, name: str, write: Any
) -> None:
    expected = read_question_file(write_jsonl(tmp_path / "q.jsonl", RECORDS))
    got = read_question_file(write(tmp_path / name))
    assert [(q.id, q.question, q.choices, q.gold) for q in got] == [
        (q.id, q.question, q.choices, q.gold) for q in expected
    ]
    assert [q.fields.get("topic") for q in got][1:] == ["physics", "biology"]


def test_a_bad_record_is_named_by_file_line_and_field(tmp_path: Path) -> None:
    bad = [*RECORDS[:2], {**RECORDS[2], "gold": 5}]
    path = write_jsonl(tmp_path / "site.jsonl", bad)
    with pytest.raises(DataError, match=r"site\.jsonl:3: field 'gold' is 5, out of range for 2 choices"):
        read_question_file(path)


def test_a_csv_row_is_named_by_its_row_and_field(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    path.write_text('question,choices,gold\nQ1,"[""a"", ""b""]",0\nQ2,a;b,1\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"site\.csv:2: field 'choices' must be a list"):
        read_question_file(path)


def test_a_required_field_a_record_lacks_is_named_with_its_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "site.jsonl", RECORDS)
    with pytest.raises(DataError, match=r"site\.jsonl:1: field 'topic' is missing .*task\.required_fields"):
        read_question_file(path, required=["topic"])
    assert len(read_question_file(path, required=["question"])) == 3


def test_an_empty_file_and_an_unknown_format_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no questions"):
        read_question_file(tmp_path / "empty.jsonl")
    (tmp_path / "site.xlsx").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=r"unknown format \.xlsx"):
        read_question_file(tmp_path / "site.xlsx")


def test_what_a_site_tells_the_server_about_its_bad_file_holds_no_record_value() -> None:
    message = "client 2: /data/site.jsonl:7: field 'choices' must be a list of >= 2 strings, got ['SECRET']"
    told = without_values(message)
    assert "SECRET" not in told
    assert told.startswith("client 2: /data/site.jsonl:7: field 'choices' must be a list")
    assert without_values(told) == told
    assert (
        without_values("site.jsonl:3: field 'gold' is 5, out of range")
        == "site.jsonl:3: field 'gold' is 5, out of range"
    )


# --------------------------------------------------------------------------------------------
# Config and data of an experiment


def test_client_files_need_client_source_files_and_one_file_per_client(tiny_models: TinyModels) -> None:
    base = ALGORITHM_CONFIGS["fedavg"](tiny_models)
    with pytest.raises(ConfigError, match="client_source = 'partition'"):
        build_config({**base, "task": {**base["task"], "client_data": ["a.jsonl", "b.jsonl"]}})
    with pytest.raises(ConfigError, match=r"names 1 files for federation\.num_clients=2"):
        build_config({**base, "task": {**base["task"], "client_source": "files", "client_data": ["a.jsonl"]}})


def test_each_client_reads_its_own_file_and_a_node_path_takes_precedence(
    tiny_models: TinyModels, tmp_path: Path
) -> None:
    a, b, node = _site_files(tmp_path, [3, 5, 7])
    base = ALGORITHM_CONFIGS["fedavg"](tiny_models)
    config = build_config(
        {**base, "task": {**base["task"], "client_source": "files", "client_data": [str(a), str(b)]}}
    )
    data = ExperimentData.load(config)
    assert data.split.clients == ()
    assert data.split.aux, "the server's auxiliary set still comes from the task's training split"
    assert [len(data.client_records(config, k)) for k in (0, 1)] == [3, 5]
    assert len(data.client_records(config, 1, str(node))) == 7
    nameless = build_config({**base, "task": {**base["task"], "client_source": "files"}})
    with pytest.raises(DataError, match=r"client 1 has no data file.*data-path"):
        ExperimentData.load(nameless).client_records(nameless, 1)
    partitioned = build_config(base)
    with pytest.raises(DataError, match="client 0: its SuperNode names data-path"):
        ExperimentData.load(partitioned).client_records(partitioned, 0, str(node))


# --------------------------------------------------------------------------------------------
# Runs on the embedded engine


def _files_config(models: TinyModels, algorithm: str, files: list[Path], **robustness: int) -> Any:
    data = ALGORITHM_CONFIGS[algorithm](models)
    data["task"] = {**data["task"], "client_source": "files", "client_data": [str(f) for f in files]}
    data["federation"] = {**data["federation"], "num_clients": len(files), "rounds": 1}
    if "client_models" in data["federation"]:
        data["federation"]["client_models"] = (data["federation"]["client_models"] * len(files))[: len(files)]
    data["robustness"] = robustness
    return build_config(data)


def _recorded_sizes(out: Path) -> dict[int, float]:
    return {
        m["client"]: m["value"]
        for m in read_metrics(out)
        if m["metric"] == "num_examples" and m["round"] == 1
    }


@pytest.mark.parametrize(
    "algorithm", sorted(name for name in ALGORITHM_CONFIGS if name not in ("zeroshot", "centralized"))
)
def test_every_client_trains_on_its_own_file_and_a_bad_site_is_left_out(
    tiny_models: TinyModels, tmp_path: Path, algorithm: str
) -> None:
    files = _site_files(tmp_path, [6, 9, 4])
    bad = write_jsonl(tmp_path / "bad.jsonl", [*RECORDS[:1], {"question": "no choices", "gold": 0}])
    out = tmp_path / "run"
    run_experiment(_files_config(tiny_models, algorithm, [files[0], bad, files[2]]), out)
    assert _recorded_sizes(out) == {0: 6.0, 2: 4.0}
    errors = [m for m in read_metrics(out) if m["metric"] == "data_error"]
    assert [(m["round"], m["client"]) for m in errors] == [(0, 1)]
    assert "bad.jsonl:2: field 'choices' must be a list" in errors[0]["note"]
    dropped = {m["client"] for m in read_metrics(out) if m["metric"] == "dropped_out"}
    assert dropped == {1}


def test_too_few_usable_sites_stop_the_run_before_any_training_naming_every_bad_file(
    tiny_models: TinyModels, tmp_path: Path
) -> None:
    (good,) = _site_files(tmp_path, [5])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**RECORDS[0], "gold": "one"}])
    out = tmp_path / "run"
    config = _files_config(tiny_models, "fedavg", [good, bad], min_clients=2)
    with pytest.raises(
        RoundError, match=r"only 1 client\(s\) have data.*client 1: .*bad\.jsonl:1: field 'gold'"
    ):
        run_experiment(config, out)
    metrics = read_metrics(out)
    assert [m["client"] for m in metrics if m["metric"] == "data_error"] == [1]
    assert not [m for m in metrics if m["metric"] in ("acc", "train_loss")], "nothing ran before the check"


def test_centralized_trains_on_the_union_of_the_client_files(tiny_models: TinyModels, tmp_path: Path) -> None:
    files = _site_files(tmp_path, [3, 4])
    config = _files_config(tiny_models, "centralized", files)
    data = ExperimentData.load(config)
    assert len(data.union_requests(config)) == len(data.split.aux) + 7


def test_the_documented_example_site_files_read_with_their_topics() -> None:
    examples = Path(__file__).resolve().parents[1] / "docs" / "examples"
    sizes = {}
    for name in ("site-a.jsonl", "site-b.csv", "site-c.jsonl"):
        questions = read_question_file(examples / name, required=["topic"])
        sizes[name] = (len(questions), {q.fields["topic"] for q in questions})
    assert sizes == {
        "site-a.jsonl": (4, {"biology"}),
        "site-b.csv": (3, {"physics"}),
        "site-c.jsonl": (3, {"earth"}),
    }
