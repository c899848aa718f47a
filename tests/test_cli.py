"""The command line: a dry run plans offline; bad input gives a one-line error, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcollm.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_prints_the_plan_with_adapter_sizes_and_trains_nothing(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["run", str(ROOT / "configs" / "smoke.toml"), "--dry-run", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 0, result.output
    assert "rounds: 2" in result.output and "adapter 0.461 M" in result.output
    assert not (tmp_path / "r").exists()


def test_unknown_task_fails_cleanly_listing_the_tasks() -> None:
    result = CliRunner().invoke(
        app, ["run", str(ROOT / "configs" / "smoke.toml"), "--dry-run", "--set", "task.name=nope"]
    )
    assert result.exit_code == 2
    assert "arc_easy" in result.output and "Traceback" not in result.output


def test_eval_prints_accuracy_json_in_the_chosen_dtype(tiny_llama: Path) -> None:
    import json

    for dtype in ("float32", "bfloat16"):
        result = CliRunner().invoke(
            app,
            ["eval", "--model", str(tiny_llama), "--task", "arc_easy", "--limit", "4", "--dtype", dtype],
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout[result.stdout.index("{") :])
        assert report["dtype"] == dtype and report["n"] == 4 and 0 <= report["acc"] <= 1
    bad = CliRunner().invoke(
        app, ["eval", "--model", str(tiny_llama), "--task", "arc_easy", "--dtype", "fp8"]
    )
    assert bad.exit_code != 0 and "--dtype" in bad.output and "Traceback" not in bad.output


def test_eval_on_a_qa_task_generates_and_scores_every_answer(tiny_llama: Path) -> None:
    import json

    from fedcollm.evaluation.text_metrics import score_text

    result = CliRunner().invoke(
        app, ["eval", "--model", str(tiny_llama), "--task", "nq_open", "--limit", "3", "--batch-size", "2"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["n"] == 3 and report["split"] == "test" and len(report["examples"]) == 3
    for example in report["examples"]:
        scores = score_text(example["prediction"], example["references"])
        assert (example["exact_match"], example["f1"], example["rouge_l"]) == (
            scores.exact_match,
            scores.f1,
            scores.rouge_l,
        )
    assert report["f1"] == pytest.approx(sum(e["f1"] for e in report["examples"]) / 3)
