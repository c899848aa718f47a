"""`fedcollm report`: plots and tables of finished runs and comparisons from their files alone."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcollm.cli import app
from fedcollm.config import build_config
from fedcollm.engines import run_experiment
from fedcollm.experiment.compare import run_comparison
from tests.helpers import read_metrics, run_files, tiny_config

PNG = b"\x89PNG\r\n\x1a\n"
WIDE = {"COLUMNS": "200"}  # rich fits tables to the terminal; keep each cell on one line


def report(*paths: Path) -> object:
    return CliRunner().invoke(app, ["report", *map(str, paths)], env=WIDE)


@pytest.fixture(scope="module")
def tracked_run(tiny_llama: Path, tiny_llama_big: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny FedCoLLM run (SLM and LLM) that wrote TensorBoard events."""
    out = tmp_path_factory.mktemp("render") / "run"
    run_experiment(build_config(tiny_config(tiny_llama, tiny_llama_big, report_to=["tensorboard"])), out)
    return out


def _percent(metrics: list[dict], role: str, rnd: int, key: str) -> str:
    value = {(m["role"], m["round"], m["metric"]): m["value"] for m in metrics if m["client"] is None}
    return f"{100 * value[(role, rnd, key)]:.1f} ± {100 * value[(role, rnd, key + '_stderr')]:.1f}"


def test_a_run_folder_gets_its_plots_and_a_table_of_final_accuracies(
    tracked_run: Path, tmp_path: Path
) -> None:
    before = run_files(tracked_run)
    result = report(tracked_run)
    assert result.exit_code == 0, result.output
    plots = tracked_run / "plots"
    names = ("accuracy_slm.png", "accuracy_llm.png", "loss_per_round.png", "loss_per_step.png")
    assert sorted(p.name for p in plots.iterdir()) == sorted(names)
    assert all((plots / name).read_bytes().startswith(PNG) for name in names)
    after = {k: v for k, v in run_files(tracked_run).items() if not k.startswith("plots/")}
    assert after == before  # nothing re-run, nothing rewritten

    metrics = read_metrics(tracked_run)
    last = max(m["round"] for m in metrics if m["metric"] == "acc")
    for role in ("SLM", "LLM"):
        row = next(line for line in result.stdout.splitlines() if f" {role} " in line)
        for key in ("acc", "acc_norm"):
            for rnd in (0, last):
                assert _percent(metrics, role.lower(), rnd, key) in row, (role, key, rnd, row)

    untracked = tmp_path / "untracked"  # the same run without TensorBoard events: no per-step plot
    shutil.copytree(tracked_run, untracked, ignore=shutil.ignore_patterns("tensorboard", "plots"))
    assert report(untracked).exit_code == 0
    assert sorted(p.name for p in (untracked / "plots").iterdir()) == sorted(names[:3])


def test_a_comparison_folder_gets_the_tables_compare_wrote(tiny_llama: Path, tmp_path: Path) -> None:
    # Neither the paper's order nor the registry's nor by name: the rebuilt report keeps the runs' own.
    methods = ["standalone", "fedcollm", "fedavg"]
    base = build_config(
        tiny_config(
            tiny_llama, tiny_llama, federation={"rounds": 1, "num_clients": 2}, compare={"methods": methods}
        )
    )
    runs = run_comparison(base, tmp_path, run_experiment, methods, ["arc_easy"])
    names = ["report.md", "table1_llm.csv", "table2_slm.csv", "table3_communication.csv"]
    written = {name: (tmp_path / name).read_bytes() for name in names}
    plots = {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}
    assert plots and "FedAvg" in written["table3_communication.csv"].decode()
    for path in [tmp_path / name for name in names] + list(tmp_path.glob("*.png")):
        path.unlink()

    fedavg = next(r.folder for r in runs if r.method == "fedavg")
    unfinished = tmp_path / "runs" / "arc_easy-fedavg-unfinished"  # a run that stopped early
    shutil.copytree(fedavg, unfinished)
    (unfinished / "results.md").unlink()
    older = tmp_path / "runs" / "arc_easy-fedavg-older"  # an earlier run of the same method
    shutil.copytree(fedavg, older)
    lines = [json.loads(line) for line in (older / "metrics.jsonl").read_text().splitlines()]
    (older / "metrics.jsonl").write_text("".join(json.dumps(m | {"value": 0.999}) + "\n" for m in lines))
    os.utime(older / "results.md", (0, 0))

    result = report(tmp_path)
    assert result.exit_code == 0, result.output
    assert {name: (tmp_path / name).read_bytes() for name in names} == written
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.png")} == plots
    assert written["report.md"].decode() in result.stdout
    assert f"{unfinished}: left out, not finished" in result.output
    assert f"{older}: left out, {fedavg} is a later run" in result.output


def test_a_folder_that_is_neither_fails_naming_what_it_lacks(tracked_run: Path, tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.toml").write_text('algorithm = "fedavg"\n')
    shutil.rmtree(tracked_run / "plots", ignore_errors=True)
    for folder, lacks in ((tmp_path / "half", "metrics.jsonl"), (tmp_path / "nope", "no such folder")):
        result = report(tracked_run, folder)  # a good folder first: nothing is written for it either
        assert result.exit_code == 2, result.output
        assert "error:" in result.output and str(folder) in result.output and lacks in result.output
        assert "Traceback" not in result.output
        assert not (tracked_run / "plots").exists()
    assert "config.toml" not in report(tmp_path / "half").output.split("has no")[1].split(")")[0]
    assert "runs/<task>-<method>-<hash>/" in report(tmp_path / "half").output


def _communication(folder: Path, *, bytes_per_param: int = 4) -> None:
    """A run's communication.json: 2 rounds of 4 clients, 0.4608 M adapter parameters each way."""
    folder.mkdir(parents=True)
    sent = bytes_per_param * 460800 * 4
    rounds = [{"round": i, "clients": 4, "down_bytes": sent, "up_bytes": sent} for i in (1, 2)]
    table3 = {"full_model_params_M": 134.515008, "transmitted_params_M": 0.4608, "param_percent": 0.34256}
    (folder / "communication.json").write_text(json.dumps({"table3": table3, "rounds": rounds}))


def test_table3_has_one_row_per_method_over_seeds_and_ranges_what_differs(tmp_path: Path) -> None:
    from fedcollm.experiment.report import RunRef, communication_rows

    runs = []
    for seed in (0, 1, 2):
        for method in ("fedavg", "fedcollm"):
            folder = tmp_path / f"{method}-{seed}"
            _communication(folder)
            runs.append(RunRef("arc_easy", method, folder, seed))
    rows = communication_rows(runs)
    assert [(r["method"], r["seeds"]) for r in rows] == [("FedAvg", "3"), ("FedCoLLM", "3")]
    assert rows[0]["MB per client per round"] == "3.69" and rows[0]["transmitted (M)"] == "0.461"

    # A seed that sent float16 adapters: its bytes differ from the others', shown as a range.
    half = tmp_path / "fedavg-3"
    _communication(half, bytes_per_param=2)
    rows = communication_rows([*runs, RunRef("arc_easy", "fedavg", half, 3)])
    assert rows[0]["seeds"] == "4" and rows[0]["MB per client per round"] == "1.84–3.69"
    assert rows[0]["transmitted (M)"] == "0.461" and rows[1]["MB per client per round"] == "3.69"
    assert "seeds" not in communication_rows(runs[:2])[0]  # one seed: no seeds column
