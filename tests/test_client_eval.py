"""Each client's own evaluation file (`task.client_eval`): the SLM a client holds is scored where the
file is, and only the scores reach the run's record (per client, and their mean); a file that does
not fit leaves its client out before the first round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcollm.config import ConfigError, build_config
from fedcollm.engines import run_experiment
from tests.helpers import ALGORITHM_CONFIGS, TinyModels, read_metrics

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def _question_file(path: Path, canary: str, n: int = 4) -> Path:
    records = [
        {
            "id": f"{canary}-{i}",
            "question": f"{canary} asks: what follows {i}?",
            "choices": [str(i + 1), "x", "y"],
            "gold": 0,
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["fedavg", "standalone"])
def test_each_client_scores_the_slm_it_holds_on_its_own_file_and_only_scores_leave(
    tiny_models: TinyModels, tmp_path: Path, name: str
) -> None:
    files = [_question_file(tmp_path / f"eval-{k}.jsonl", f"SECRET{k}", n=3 + k) for k in (0, 1)]
    data = ALGORITHM_CONFIGS[name](tiny_models)
    data["task"] = {**data["task"], "client_eval": True, "client_eval_data": [str(f) for f in files]}
    out = tmp_path / "run"
    run_experiment(build_config(data), out)
    metrics = read_metrics(out)
    local = {
        (m["round"], m["client"], m["metric"]): m["value"]
        for m in metrics
        if m["metric"].startswith("local_")
    }
    for rnd in (0, 2):
        assert local[(rnd, 0, "local_n")] == 3 and local[(rnd, 1, "local_n")] == 4
        mean = (local[(rnd, 0, "local_acc")] + local[(rnd, 1, "local_acc")]) / 2
        assert local[(rnd, None, "local_acc")] == pytest.approx(mean)
    # The server's public evaluation goes on as before, on its own questions.
    assert any(m["metric"] == "acc" and m["role"] == "slm" for m in metrics)
    results = (out / "results.md").read_text()
    assert "| clients' own files | acc before | acc after |" in results
    assert "| client 1 |" in results
    for path in out.rglob("*"):
        if path.is_file():
            assert b"SECRET" not in path.read_bytes(), f"{path} holds a client's evaluation question"


def test_a_client_whose_evaluation_file_does_not_fit_is_left_out(
    tiny_models: TinyModels, tmp_path: Path
) -> None:
    good = _question_file(tmp_path / "good.jsonl", "ok")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "b1", "question": "q", "choices": ["only one"], "gold": 0}\n', encoding="utf-8")
    data = ALGORITHM_CONFIGS["fedavg"](tiny_models)
    data["task"] = {**data["task"], "client_eval": True, "client_eval_data": [str(good), str(bad)]}
    out = tmp_path / "run"
    run_experiment(build_config(data), out)
    errors = [m for m in read_metrics(out) if m["metric"] == "data_error"]
    assert [m["client"] for m in errors] == [1]
    assert "client 1: evaluation file: " in errors[0]["note"] and "bad.jsonl:1" in errors[0]["note"]
    assert {m["client"] for m in read_metrics(out) if m["metric"] == "local_n"} == {0, None}


def test_client_eval_files_are_checked_against_the_config(tiny_models: TinyModels) -> None:
    data = ALGORITHM_CONFIGS["fedavg"](tiny_models)
    with pytest.raises(ConfigError, match="client_eval is false"):
        build_config({**data, "task": {**data["task"], "client_eval_data": ["a.jsonl", "b.jsonl"]}})
    with pytest.raises(ConfigError, match=r"names 1 files for federation\.num_clients=2"):
        build_config({**data, "task": {**data["task"], "client_eval": True, "client_eval_data": ["a.jsonl"]}})


def test_a_client_of_an_instruction_task_scores_generated_answers_on_its_own_file(
    tiny_models: TinyModels, tmp_path: Path
) -> None:
    data = ALGORITHM_CONFIGS["fedcollm"](tiny_models)
    data["task"] = {
        "name": "instructions",
        "source": str(EXAMPLES / "instructions-a.jsonl"),
        "eval_data": str(EXAMPLES / "instructions-eval.csv"),
        "aux_fraction": 0.34,
        "client_eval": True,
        "client_eval_data": [str(EXAMPLES / "chat-b.jsonl"), str(EXAMPLES / "instructions-eval.csv")],
        "plain_template": "turns",  # chat-b holds a conversation of two exchanges
    }
    data["eval"] = {"limit": 2, "max_new_tokens": 4, "batch_size": 2}
    out = tmp_path / "run"
    run_experiment(build_config(data), out)
    local = {(m["client"], m["metric"]) for m in read_metrics(out) if m["metric"].startswith("local_")}
    assert {(0, "local_exact_match"), (1, "local_rouge_l"), (None, "local_f1")} <= local


def test_a_conversation_the_plain_template_cannot_render_is_named_with_the_setting_to_change(
    tiny_models: TinyModels, tmp_path: Path
) -> None:
    from fedcollm.errors import FedcollmError

    data = ALGORITHM_CONFIGS["fedavg"](tiny_models)
    data["task"] = {
        "name": "instructions",
        "source": str(EXAMPLES / "chat-b.jsonl"),
        "eval_data": str(EXAMPLES / "instructions-eval.csv"),
        "aux_fraction": 0.0,
    }
    data["federation"] = {"rounds": 1, "num_clients": 1}
    with pytest.raises(FedcollmError, match=r"example 'cb-2'.*set task\.plain_template = \"turns\""):
        run_experiment(build_config(data), tmp_path / "run")
