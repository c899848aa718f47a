"""Checkpoints in the round loop: resume after a crash, a kill or a corrupt checkpoint, and a run
folder that is never silently reused. (Resume for every algorithm: tests/test_contract.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

import fedcollm.engines.local as local_engine
from fedcollm.config import build_config
from fedcollm.engines import run_experiment
from fedcollm.engines.local import InProcessTransport
from fedcollm.experiment.checkpoint import CHECKPOINT_DIR, CheckpointError
from fedcollm.experiment.loop import RoundError
from fedcollm.experiment.recording import RunFolderError
from fedcollm.protocol import ClientReply, Payload, Reporter
from tests.helpers import Interrupted, crash_clients_in_round, run_files, tiny_config


def _fedavg(slm: Path, rounds: int, **overrides: object) -> dict:
    """A small FedAvg experiment (no LLM): the cheapest run that exercises the round loop."""
    return tiny_config(
        slm, slm, algorithm="fedavg", federation={"rounds": rounds, "num_clients": 2}, **overrides
    )


def test_resume_without_a_checkpoint_starts_from_the_beginning(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path
) -> None:
    cfg = build_config(tiny_config(tiny_llama, tiny_llama_big, federation={"rounds": 1, "num_clients": 2}))
    run_experiment(cfg, tmp_path / "straight")
    run_experiment(cfg, tmp_path / "fresh", resume=True)
    assert run_files(tmp_path / "fresh") == run_files(tmp_path / "straight")


def test_keep_last_bounds_the_checkpoints_on_disk(tiny_llama: Path, tmp_path: Path) -> None:
    cfg = build_config(_fedavg(tiny_llama, 3, checkpoint={"keep_last": 1}))
    run_experiment(cfg, tmp_path / "run")
    assert [p.name for p in (tmp_path / "run" / CHECKPOINT_DIR).iterdir()] == ["round-0003"]


def test_checkpoints_can_be_switched_off(tiny_llama: Path, tmp_path: Path) -> None:
    cfg = build_config(_fedavg(tiny_llama, 1, checkpoint={"enabled": False}))
    run_experiment(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / CHECKPOINT_DIR).exists()


def test_a_finished_run_is_not_restarted_without_resume_or_overwrite(
    tiny_llama: Path, tmp_path: Path
) -> None:
    cfg = build_config(_fedavg(tiny_llama, 1))
    run_experiment(cfg, tmp_path / "run")
    before = run_files(tmp_path / "run")
    with pytest.raises(RunFolderError, match="--resume"):
        run_experiment(cfg, tmp_path / "run")
    assert run_files(tmp_path / "run") == before


def test_resume_refuses_a_folder_holding_a_different_experiment(tiny_llama: Path, tmp_path: Path) -> None:
    base = _fedavg(tiny_llama, 1)
    run_experiment(build_config(base), tmp_path / "run")
    before = run_files(tmp_path / "run")
    other = build_config(base | {"seed": 1})
    with pytest.raises(RunFolderError, match="different experiment"):
        run_experiment(other, tmp_path / "run", resume=True)
    assert run_files(tmp_path / "run") == before


def test_a_corrupt_newest_checkpoint_is_skipped_with_a_note(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = build_config(_fedavg(tiny_llama, 3))
    run_experiment(cfg, tmp_path / "straight")
    with monkeypatch.context() as patch:
        crash_clients_in_round(patch, crash_round=3)
        with pytest.raises(Interrupted):
            run_experiment(cfg, tmp_path / "run")
    newest = tmp_path / "run" / CHECKPOINT_DIR / "round-0002" / "arrays.npz"
    newest.write_bytes(newest.read_bytes()[:-10] + b"0123456789")

    class Notes(Reporter):
        def __init__(self) -> None:
            self.lines: list[str] = []

        def message(self, text: str) -> None:
            self.lines.append(text)

    notes = Notes()
    run_experiment(cfg, tmp_path / "run", resume=True, reporter=notes)
    assert any("round-0002" in line and "checksum" in line for line in notes.lines)
    assert any("after round 1" in line for line in notes.lines)
    assert run_files(tmp_path / "run") == run_files(tmp_path / "straight")


def test_a_checkpoint_of_another_experiment_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    base = _fedavg(tiny_llama, 1)
    run_experiment(build_config(base), tmp_path / "a")
    run_experiment(build_config(base | {"seed": 1}), tmp_path / "b")
    (tmp_path / "a" / CHECKPOINT_DIR).rename(tmp_path / "a" / "old")
    (tmp_path / "b" / CHECKPOINT_DIR).rename(tmp_path / "a" / CHECKPOINT_DIR)
    with pytest.raises(CheckpointError, match="another experiment"):
        run_experiment(build_config(base), tmp_path / "a", resume=True)


def test_too_few_uploads_stop_the_round_pointing_at_the_last_checkpoint(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = build_config(_fedavg(tiny_llama, 2, robustness={"min_clients": 2}))

    class OnePoisoned(InProcessTransport):
        def fit(self, payload: Payload, rnd: int) -> list[ClientReply]:
            replies = super().fit(payload, rnd)
            if rnd == 2:
                name = next(iter(replies[1].arrays))
                replies[1].arrays[name] = replies[1].arrays[name] * float("nan")
            return replies

    monkeypatch.setattr(local_engine, "InProcessTransport", OnePoisoned)
    with pytest.raises(RoundError, match="checkpoint of round 1") as caught:
        run_experiment(cfg, tmp_path / "run")
    assert "client 1" in str(caught.value)
    assert (tmp_path / "run" / CHECKPOINT_DIR / "round-0001" / "meta.json").is_file()
    rejected = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"rejected"' in line
    ]
    assert [(m["round"], m["client"]) for m in rejected] == [(2, 1)]


# ------------------------------------------------------------------------- a real process, a real kill


def _fedcollm(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedcollm", *args]


@pytest.mark.slow  # three CLI processes (~1 min on an idle machine); CI runs the slow tests too
def test_a_process_killed_mid_round_and_resumed_ends_bit_for_bit_like_an_uninterrupted_one(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path
) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(
        tomli_w.dumps(tiny_config(tiny_llama, tiny_llama_big, federation={"rounds": 3, "num_clients": 2}))
    )
    env = os.environ | {"COLUMNS": "200"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(
        _fedcollm("run", str(config), "--out", str(straight)), env=env, check=True, capture_output=True
    )

    process = subprocess.Popen(
        _fedcollm("run", str(config), "--out", str(killed)),
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert process.stderr is not None
    seen = []
    for line in process.stderr:  # one log line per phase when stderr is not a terminal
        seen.append(line)
        if "round 2 · client 1 training" in line:
            os.kill(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "".join(seen)
    assert not (killed / "results.md").exists()
    assert (killed / CHECKPOINT_DIR / "round-0001").is_dir()

    subprocess.run(_fedcollm("run", "--resume", str(killed)), env=env, check=True, capture_output=True)
    assert run_files(killed) == run_files(straight)


def test_client_state_cannot_be_resumed_on_an_engine_whose_clients_live_elsewhere(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedcollm.engines.flower.options import FlowerOptions
    from fedcollm.engines.flower.transport import FlowerTransport
    from fedcollm.experiment.loop import run_rounds
    from fedcollm.experiment.setup import prepare_server

    cfg = build_config(
        tiny_config(
            tiny_llama, tiny_llama_big, algorithm="standalone", federation={"rounds": 2, "num_clients": 2}
        )
    )
    with monkeypatch.context() as patch:
        crash_clients_in_round(patch, crash_round=2)
        with pytest.raises(Interrupted):
            run_experiment(cfg, tmp_path / "run")

    reporter = Reporter()
    algorithm, server, recorder = prepare_server(
        cfg, tmp_path / "run", overwrite=False, resume=True, reporter=reporter
    )
    remote = FlowerTransport(None, cfg, FlowerOptions(), reporter)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="SuperNodes"):
        run_rounds(algorithm, server, remote, recorder, reporter, resume=True)


def test_a_checkpoint_without_client_state_is_not_resumed_where_clients_need_it(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = build_config(
        tiny_config(
            tiny_llama, tiny_llama, algorithm="standalone", federation={"rounds": 2, "num_clients": 2}
        )
    )

    class RemoteState(InProcessTransport):  # writes checkpoints as Flower does: no client state
        def client_states(self) -> None:  # type: ignore[override]
            return None

        def fit(self, payload: Payload, rnd: int) -> list[ClientReply]:
            if rnd == 2:
                raise Interrupted("crash in round 2")
            return super().fit(payload, rnd)

    with monkeypatch.context() as patch:
        patch.setattr(local_engine, "InProcessTransport", RemoteState)
        with pytest.raises(Interrupted):
            run_experiment(cfg, tmp_path / "run")
    with pytest.raises(CheckpointError, match="does not hold"):
        run_experiment(cfg, tmp_path / "run", resume=True)
