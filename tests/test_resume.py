"""Checkpoints in the round loop: a run interrupted and resumed ends exactly where an
uninterrupted one does, for every algorithm, and the run folder is never silently reused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

import fedcollm.experiment.run as run_module
from fedcollm.config import build_config
from fedcollm.engines.local import InProcessTransport
from fedcollm.experiment.checkpoint import CHECKPOINT_DIR, CheckpointError
from fedcollm.experiment.loop import RoundError
from fedcollm.experiment.recording import RunFolderError
from fedcollm.experiment.run import run_experiment
from fedcollm.parties.runtime import ClientReply, Payload
from tests.test_e2e import tiny_config


class Interrupted(Exception):
    """Stands in for a crash: raised by a client in the middle of a round."""


def _crash_in_round(monkeypatch: pytest.MonkeyPatch, crash_round: int) -> None:
    """Make the embedded engine fail after the first client of `crash_round` has trained."""

    class CrashingTransport(InProcessTransport):
        def fit(self, payload: Payload, rnd: int) -> list[ClientReply]:
            if rnd == crash_round:
                self.algorithm.client_fit(self.clients[0], payload, rnd, self.reporter)
                raise Interrupted(f"crash in round {rnd}")
            return super().fit(payload, rnd)

    monkeypatch.setattr(run_module, "InProcessTransport", CrashingTransport)


def _files(out: Path) -> dict[str, bytes]:
    """Everything a finished run leaves, except checkpoints: metrics, results, adapters."""
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and CHECKPOINT_DIR not in p.parts
    }


def _fedavg(slm: Path, rounds: int, **overrides: object) -> dict:
    """A small FedAvg experiment (no LLM): the cheapest run that exercises the round loop."""
    return tiny_config(
        slm, slm, algorithm="fedavg", federation={"rounds": rounds, "num_clients": 2}, **overrides
    )


def _config(slm: Path, llm: Path, other: Path, algorithm: str) -> dict:
    federation: dict = {"rounds": 3, "num_clients": 2}
    extra: dict = {}
    if algorithm == "fedmkt":
        federation["client_models"] = [str(slm), str(other)]
    if algorithm == "crosslm":
        extra["crosslm"] = {
            "num_candidates": 4,
            "max_new_tokens": 12,
            "generation_batch_size": 4,
            "heldout_task": "arc_challenge",
            "heldout_limit": 4,
        }
    return tiny_config(slm, llm, algorithm=algorithm, federation=federation, **extra)


@pytest.mark.parametrize(
    "algorithm", ["fedcollm", "fedavg", "standalone", "centralized", "fedmkt", "crosslm"]
)
def test_a_run_crashed_mid_round_and_resumed_equals_an_uninterrupted_run(
    algorithm: str,
    tiny_llama: Path,
    tiny_llama_big: Path,
    tiny_other_tokenizer: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = build_config(_config(tiny_llama, tiny_llama_big, tiny_other_tokenizer, algorithm))
    run_experiment(cfg, tmp_path / "straight")

    crashed = tmp_path / "crashed"
    with monkeypatch.context() as patch:
        _crash_in_round(patch, crash_round=2)
        if cfg.algorithm == "centralized":  # no clients: crash in the server step instead
            cls = type(run_module.ALGORITHMS["centralized"](cfg))
            original = cls.server_update

            def crash(self, server, aggregate, rnd, reporter):  # type: ignore[no-untyped-def]
                if rnd == 2:
                    raise Interrupted("crash in round 2")
                return original(self, server, aggregate, rnd, reporter)

            patch.setattr(cls, "server_update", crash)
        with pytest.raises(Interrupted):
            run_experiment(cfg, crashed)
    assert sorted(p.name for p in (crashed / CHECKPOINT_DIR).iterdir()) == ["round-0000", "round-0001"]
    assert not (crashed / "results.md").exists()

    run_experiment(cfg, crashed, resume=True)
    assert _files(crashed) == _files(tmp_path / "straight")


def test_resume_without_a_checkpoint_starts_from_the_beginning(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path
) -> None:
    cfg = build_config(tiny_config(tiny_llama, tiny_llama_big, federation={"rounds": 1, "num_clients": 2}))
    run_experiment(cfg, tmp_path / "straight")
    run_experiment(cfg, tmp_path / "fresh", resume=True)
    assert _files(tmp_path / "fresh") == _files(tmp_path / "straight")


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
    before = _files(tmp_path / "run")
    with pytest.raises(RunFolderError, match="--resume"):
        run_experiment(cfg, tmp_path / "run")
    assert _files(tmp_path / "run") == before


def test_resume_refuses_a_folder_holding_a_different_experiment(tiny_llama: Path, tmp_path: Path) -> None:
    base = _fedavg(tiny_llama, 1)
    run_experiment(build_config(base), tmp_path / "run")
    before = _files(tmp_path / "run")
    other = build_config(base | {"seed": 1})
    with pytest.raises(RunFolderError, match="different experiment"):
        run_experiment(other, tmp_path / "run", resume=True)
    assert _files(tmp_path / "run") == before


def test_a_corrupt_newest_checkpoint_is_skipped_with_a_note(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = build_config(_fedavg(tiny_llama, 3))
    run_experiment(cfg, tmp_path / "straight")
    with monkeypatch.context() as patch:
        _crash_in_round(patch, crash_round=3)
        with pytest.raises(Interrupted):
            run_experiment(cfg, tmp_path / "run")
    newest = tmp_path / "run" / CHECKPOINT_DIR / "round-0002" / "arrays.npz"
    newest.write_bytes(newest.read_bytes()[:-10] + b"0123456789")

    class Notes(run_module.Reporter):
        def __init__(self) -> None:
            self.lines: list[str] = []

        def message(self, text: str) -> None:
            self.lines.append(text)

    notes = Notes()
    run_experiment(cfg, tmp_path / "run", resume=True, reporter=notes)
    assert any("round-0002" in line and "checksum" in line for line in notes.lines)
    assert any("after round 1" in line for line in notes.lines)
    assert _files(tmp_path / "run") == _files(tmp_path / "straight")


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

    monkeypatch.setattr(run_module, "InProcessTransport", OnePoisoned)
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
    assert _files(killed) == _files(straight)


def test_client_state_cannot_be_resumed_on_an_engine_whose_clients_live_elsewhere(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedcollm.experiment.loop import run_rounds
    from fedcollm.experiment.run import prepare_server
    from fedcollm.parties.runtime import ClientRuntime, Reporter, load_client_models

    cfg = build_config(
        tiny_config(
            tiny_llama, tiny_llama_big, algorithm="standalone", federation={"rounds": 2, "num_clients": 2}
        )
    )
    with monkeypatch.context() as patch:
        _crash_in_round(patch, crash_round=2)
        with pytest.raises(Interrupted):
            run_experiment(cfg, tmp_path / "run")

    class RemoteClients:  # like the Flower transport: messages only, no access to client state
        def __init__(self, inner: InProcessTransport) -> None:
            self.inner = inner

        def fit(self, payload: Payload, rnd: int) -> list[ClientReply]:
            return self.inner.fit(payload, rnd)

        def evaluate(self, payload: Payload, rnd: int) -> list[ClientReply]:
            return self.inner.evaluate(payload, rnd)

    reporter = Reporter()
    algorithm, server, recorder = prepare_server(
        cfg, tmp_path / "run", overwrite=False, resume=True, reporter=reporter
    )
    clients = [
        ClientRuntime.create(cfg, server.data, k, lm)
        for k, lm in enumerate(load_client_models(cfg, server.slm))
    ]
    transport = RemoteClients(InProcessTransport(algorithm, clients, reporter))
    with pytest.raises(CheckpointError, match="SuperNodes"):
        run_rounds(algorithm, server, transport, recorder, reporter, resume=True)
