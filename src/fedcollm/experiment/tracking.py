"""Watching a run: its step losses and per-round metrics as TensorBoard event files (`report_to`).

With `report_to = ["tensorboard"]` a run writes event files under `<run>/tensorboard/`, flushed as
they are written, so `tensorboard --logdir <run>/tensorboard` follows the run live:

- `steps/`: the loss of every optimiser step as `train/<party>/loss`, where party is `client-K`
  (client K's local training) or `server` (the server's training: FedCoLLM's mutual distillation,
  whose loss is the sum of the LLM's and the SLM's, or the LLM training of FedMKT, Centralized
  and CrossLM). Its global step counts the optimiser steps of the whole run, over every party, in
  the order they were taken: a curve per party, with the gaps where others trained.
- `rounds/`: every line of `metrics.jsonl`, at global step = its round. Evaluation results
  (`acc`, `acc_norm`, their `_stderr`, `n`, and CrossLM's `heldout_` ones) as
  `eval/<role>/<metric>` (`eval/slm/acc`, `eval/llm/acc_norm`; one client's own as
  `eval/slm/client-2/acc`), everything else as `round/<who>/<metric>` (`round/client-0/train_loss`,
  `round/llm/distill_loss`; `round/clients/...` for the means SecAgg+ reveals).

Two folders because the two have different step axes. A resumed run tells each where it goes on
(TensorBoard's `purge_step`): the events a stopped run wrote after its last checkpoint are hidden
and the resumed run's replace them; the step count continues from the checkpoint.

Not recorded: on the Flower engines clients train in other processes (ClientApps on SuperNodes or
simulation workers), so their step losses stay there; the server process records its own steps
and the per-round metrics clients send back (each one's `train_loss`, or their means under
SecAgg+).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcollm.config import ExperimentConfig
from fedcollm.protocol import Metric, Reporter, StepCallback

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

TENSORBOARD_DIR = "tensorboard"
"""The run folder's subfolder of event files."""
STEPS = "steps"
"""Events per optimiser step (`<run>/tensorboard/steps`)."""
ROUNDS = "rounds"
"""Events per round (`<run>/tensorboard/rounds`)."""

EVAL_METRICS = frozenset(
    {
        *(
            f"{key}{suffix}"
            for key in ("acc", "acc_norm", "exact_match", "f1", "rouge_l")
            for suffix in ("", "_stderr")
        ),
        "n",
    }
)
"""What an evaluation returns (multiple choice: `EvalResult.summary`; answers in free text:
`fedcollm.evaluation.free_text.summary`); with a `heldout_` prefix, CrossLM's."""


def metric_tag(metric: Metric) -> str:
    """The TensorBoard tag of one line of metrics.jsonl (see the module docstring)."""
    if metric.role == "client":
        who = "clients" if metric.client is None else f"client-{metric.client}"
    else:
        who = metric.role if metric.client is None else f"{metric.role}/client-{metric.client}"
    group = "eval" if metric.metric.removeprefix("heldout_") in EVAL_METRICS else "round"
    return f"{group}/{who}/{metric.metric}"


class TensorBoardTracker:
    """Writes a run's step losses and round metrics to `<folder>/steps` and `<folder>/rounds`.

    Writers open at the first event. With `resume` and no `restore`, the run starts again from
    its beginning, so everything written before is hidden.
    """

    def __init__(self, folder: Path, *, resume: bool = False) -> None:
        self.folder = folder
        self.step = 0
        """Optimiser steps so far, over every party (the global step of `steps/`)."""
        self._purge: dict[str, int] = {STEPS: 0, ROUNDS: 0} if resume else {}
        """Where each kind's next event file starts (TensorBoard's purge_step), where it must."""
        self._writers: dict[str, SummaryWriter] = {}

    def _writer(self, kind: str) -> SummaryWriter:
        writer = self._writers.get(kind)
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            purge = self._purge.pop(kind, None)  # once: a later file must not hide this one's events
            if purge is not None:
                _after_existing_events(self.folder / kind)
            writer = SummaryWriter(str(self.folder / kind), purge_step=purge)
            self._writers[kind] = writer
        return writer

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps to continue the step count."""
        return {"step": self.step}

    def restore(self, state: Mapping[str, Any], metrics: Sequence[Metric]) -> None:
        """Continue after a checkpoint holding `state` and the run's `metrics` so far.

        Events past the checkpoint (later steps, later rounds) are hidden once new ones come.
        """
        self.close()
        self.step = int(state.get("step", 0))
        last_round = max((m.round for m in metrics), default=-1)
        self._purge = {STEPS: self.step + 1, ROUNDS: last_round + 1}

    def log_loss(self, party: str, loss: float) -> None:
        """One optimiser step of `party` (`client-K` or `server`) with its loss."""
        self.step += 1
        writer = self._writer(STEPS)
        writer.add_scalar(f"train/{party}/loss", loss, self.step)
        writer.flush()

    def log_metrics(self, metrics: Iterable[Metric]) -> None:
        """Lines of metrics.jsonl, each at its round."""
        lines = list(metrics)
        if not lines:
            return
        writer = self._writer(ROUNDS)
        for metric in lines:
            writer.add_scalar(metric_tag(metric), metric.value, metric.round)
        writer.flush()

    def close(self) -> None:
        """Flush and close the event files (a later event opens new ones)."""
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def _after_existing_events(folder: Path) -> None:
    """Wait (at most a second) until a new event file in `folder` sorts after the ones there.

    TensorBoard reads a folder's event files in name order, and a purge hides only the events
    read before it; names start with the creation time in whole seconds, then host, process id
    and a counter. A resumed run's file must sort after the stopped run's for its purge to apply.
    """
    stamps = [
        int(p.name.split(".")[3])
        for p in folder.glob("events.out.tfevents.*.*")
        if p.name.split(".")[3].isdigit()
    ]
    if stamps:
        time.sleep(min(1.0, max(0.0, max(stamps) + 1 - time.time())))


def tracker_for(config: ExperimentConfig, out: Path, *, resume: bool = False) -> TensorBoardTracker | None:
    """The tracker `config.report_to` asks for in the run folder `out`, or None (nothing written)."""
    if "tensorboard" not in config.report_to:
        return None
    return TensorBoardTracker(out / TENSORBOARD_DIR, resume=resume)


class TrackingReporter(Reporter):
    """Passes everything on to `inner` and also gives the tracker the loss of each optimiser
    step, as `party`'s."""

    def __init__(self, inner: Reporter, tracker: TensorBoardTracker, party: str) -> None:
        self.inner = inner
        self.tracker = tracker
        self.party = party

    def phase(self, description: str, total: int | None = None) -> None:
        self.inner.phase(description, total)

    def advance(self, completed: int, total: int | None = None, info: str = "") -> None:
        self.inner.advance(completed, total, info)

    def message(self, text: str) -> None:
        self.inner.message(text)

    def step_callback(self) -> StepCallback:
        show = self.inner.step_callback()

        def on_step(step: int, total: int, loss: float) -> None:
            show(step, total, loss)
            self.tracker.log_loss(self.party, loss)

        return on_step


def tracking_reporter(reporter: Reporter, tracker: TensorBoardTracker | None, party: str) -> Reporter:
    """`reporter`, also recording `party`'s step losses when there is a tracker (else unchanged)."""
    if isinstance(reporter, TrackingReporter):
        reporter = reporter.inner
    return reporter if tracker is None else TrackingReporter(reporter, tracker, party)
