"""`report_to = ["tensorboard"]`: every optimiser step's loss and every metrics.jsonl line as
TensorBoard events in the run folder, read back with TensorBoard's own reader; none without it;
a resumed run's events as if it had never stopped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedcollm.config import ConfigError, build_config
from fedcollm.engines import run_experiment
from fedcollm.experiment.tracking import TensorBoardTracker, metric_tag
from fedcollm.protocol import Metric
from tests.helpers import Interrupted, event_scalars, read_metrics, tiny_config

Scalars = dict[str, list[tuple[int, float]]]


def _fedavg(slm: Path, rounds: int, **overrides: Any) -> dict[str, Any]:
    return tiny_config(
        slm, slm, algorithm="fedavg", federation={"rounds": rounds, "num_clients": 2}, **overrides
    )


def test_every_step_loss_and_every_round_metric_become_events(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    run_experiment(build_config(tiny_config(tiny_llama, tiny_llama_big, report_to=["tensorboard"])), out)
    metrics = read_metrics(out)
    steps = event_scalars(out / "tensorboard" / "steps")
    assert set(steps) == {"train/client-0/loss", "train/client-1/loss", "train/server/loss"}
    taken = sorted(step for points in steps.values() for step, _ in points)
    assert taken == list(range(1, len(taken) + 1))  # one global count over every party, no gaps

    # Each client's steps, cut by the step count it reported per round, average to its train_loss.
    for k in (0, 1):
        losses = [value for _, value in steps[f"train/client-{k}/loss"]]
        for rnd in (1, 2):
            line = {m["metric"]: m["value"] for m in metrics if m["client"] == k and m["round"] == rnd}
            count = int(line["steps"])
            this_round, losses = losses[:count], losses[count:]
            assert sum(this_round) / count == pytest.approx(line["train_loss"], rel=1e-5)
        assert losses == []
    # The run's order: both clients train, then the server distils, round after round.
    party_of = {step: tag for tag, points in steps.items() for step, _ in points}
    order = [party_of[step].split("/")[1] for step in taken]
    runs = [p for i, p in enumerate(order) if i == 0 or order[i - 1] != p]
    assert runs == ["client-0", "client-1", "server"] * 2

    rounds = event_scalars(out / "tensorboard" / "rounds")
    for key in ("eval/slm/acc", "eval/llm/acc_norm", "round/client-1/train_loss", "round/llm/distill_loss"):
        assert key in rounds
    expected: Scalars = {}
    for m in metrics:
        expected.setdefault(metric_tag(Metric(**m)), []).append((m["round"], m["value"]))
    assert set(rounds) == set(expected)
    for tag, points in expected.items():
        assert [s for s, _ in rounds[tag]] == [s for s, _ in points], tag
        assert [v for _, v in rounds[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    assert [s for s, _ in rounds["eval/slm/acc"]] == [0, 1, 2]


def test_nothing_is_written_without_report_to_and_a_fresh_start_drops_old_events(
    tiny_llama: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    run_experiment(build_config(_fedavg(tiny_llama, 1, report_to=["tensorboard"])), out)
    assert event_scalars(out / "tensorboard" / "steps")
    run_experiment(build_config(_fedavg(tiny_llama, 1)), out, overwrite=True)
    assert not (out / "tensorboard").exists()


def _crash_after_client_0_in_round(monkeypatch: pytest.MonkeyPatch, crash_round: int) -> None:
    """The embedded engine dies once client 0 of `crash_round` has trained (and reported its steps)."""
    import fedcollm.engines.local as local_engine
    from fedcollm.protocol import ClientReply, Payload

    class CrashingTransport(local_engine.InProcessTransport):
        def fit(self, payload: Payload, rnd: int) -> list[ClientReply]:
            if rnd == crash_round:
                self.algorithm.client_fit(self.clients[0], payload, rnd, self.fit_reporters[0])
                raise Interrupted(f"crash in round {rnd}")
            return super().fit(payload, rnd)

    monkeypatch.setattr(local_engine, "InProcessTransport", CrashingTransport)


def test_a_resumed_run_shows_the_events_of_an_uninterrupted_one(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = build_config(_fedavg(tiny_llama, 3, report_to=["tensorboard"]))
    run_experiment(cfg, tmp_path / "straight")

    _crash_after_client_0_in_round(monkeypatch, 2)
    with pytest.raises(Interrupted):
        run_experiment(cfg, tmp_path / "resumed")
    monkeypatch.undo()
    stopped = event_scalars(tmp_path / "resumed" / "tensorboard" / "steps")
    assert len(stopped["train/client-0/loss"]) > len(stopped["train/client-1/loss"])  # past the checkpoint

    run_experiment(cfg, tmp_path / "resumed", resume=True)
    for kind in ("steps", "rounds"):
        folder = tmp_path / "resumed" / "tensorboard" / kind
        assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # appended, not replaced
        assert event_scalars(folder) == event_scalars(tmp_path / "straight" / "tensorboard" / kind), kind


def test_metric_tags_name_group_model_and_client() -> None:
    assert metric_tag(Metric(2, "slm", None, "acc", 0.5)) == "eval/slm/acc"
    assert metric_tag(Metric(2, "slm", 3, "acc_norm", 0.5)) == "eval/slm/client-3/acc_norm"
    assert metric_tag(Metric(2, "llm", None, "heldout_acc", 0.5)) == "eval/llm/heldout_acc"
    assert metric_tag(Metric(1, "client", 0, "train_loss", 1.0)) == "round/client-0/train_loss"
    assert metric_tag(Metric(1, "client", None, "train_loss", 1.0)) == "round/clients/train_loss"
    assert metric_tag(Metric(1, "llm", None, "distill_loss", 1.0)) == "round/llm/distill_loss"


def test_an_unknown_backend_is_refused_naming_the_ones_there_are() -> None:
    assert build_config({"report_to": ["tensorboard"]}).report_to == ["tensorboard"]
    assert build_config({}).report_to == []
    with pytest.raises(ConfigError, match=r"unknown report_to backend 'wandb'; available: tensorboard"):
        build_config({"report_to": ["wandb"]})


def test_a_resumed_tracker_purges_what_came_after_its_checkpoint_even_within_the_same_second(
    tmp_path: Path,
) -> None:
    stopped = TensorBoardTracker(tmp_path)
    for loss in (1.0, 2.0, 3.0):
        stopped.log_loss("client-0", loss)
    stopped.log_metrics([Metric(0, "slm", None, "acc", 0.1), Metric(1, "slm", None, "acc", 0.2)])
    stopped.close()
    for old in tmp_path.rglob("events.out.tfevents.*"):  # a name that sorts late within its second
        stamp, _, rest = old.name.removeprefix("events.out.tfevents.").partition(".")
        old.rename(old.with_name(f"events.out.tfevents.{stamp}.~{rest}"))

    resumed = TensorBoardTracker(tmp_path, resume=True)
    resumed.restore({"step": 2}, [Metric(0, "slm", None, "acc", 0.1)])  # the checkpoint of round 0
    resumed.log_loss("client-0", 30.0)
    resumed.log_metrics([Metric(1, "slm", None, "acc", 0.5)])
    resumed.close()
    assert event_scalars(tmp_path / "steps") == {"train/client-0/loss": [(1, 1.0), (2, 2.0), (3, 30.0)]}
    assert event_scalars(tmp_path / "rounds") == {"eval/slm/acc": [(0, pytest.approx(0.1)), (1, 0.5)]}
