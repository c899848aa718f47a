"""Run several methods on several tasks with identical partition, seeds and evaluation set.

Each (task, method) run is an ordinary run folder under `<out>/runs/`, named by a hash of its
resolved configuration: a finished run with the same configuration is reused, not redone. The
runs go through a `Runner` the caller passes (`fedcollm.engines.run_experiment` from the
command line), so a comparison runs on any engine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from fedcollm.config import PAPER_METHODS, ExperimentConfig
from fedcollm.experiment.checkpoint import CHECKPOINT_DIR
from fedcollm.experiment.plan import plan, variant
from fedcollm.experiment.report import RunRef, write_report
from fedcollm.protocol import Reporter


class Runner(Protocol):
    """Runs one experiment into a run folder (`fedcollm.engines.run_experiment` is one)."""

    def __call__(
        self,
        config: ExperimentConfig,
        out: Path,
        *,
        overwrite: bool = False,
        resume: bool = False,
        reporter: Reporter | None = None,
    ) -> Any: ...


def config_key(config: ExperimentConfig) -> str:
    """A short hash of everything that determines a run's result (its name excluded)."""
    data = config.model_dump(mode="json")
    data.pop("name")
    return hashlib.sha256(repr(sorted(data.items())).encode()).hexdigest()[:10]


def _same_experiment(folder: Path, config: ExperimentConfig) -> bool:
    resolved = folder / "config.toml"
    return resolved.is_file() and resolved.read_text(encoding="utf-8") == config.to_toml()


def is_finished(folder: Path, config: ExperimentConfig) -> bool:
    """A run folder holding the results of exactly this configuration."""
    return _same_experiment(folder, config) and (folder / "results.md").is_file()


def is_started(folder: Path, config: ExperimentConfig) -> bool:
    """A run folder of exactly this configuration that stopped early (it resumes from a checkpoint)."""
    return _same_experiment(folder, config) and (folder / CHECKPOINT_DIR).is_dir()


def run_comparison(
    base: ExperimentConfig,
    out: Path,
    runner: Runner,
    methods: Sequence[str] = PAPER_METHODS,
    tasks: Sequence[str] | None = None,
    reporter: Reporter | None = None,
) -> list[RunRef]:
    """Run (or reuse) every method on every task, then write the paper-style report to `out`."""
    reporter = reporter or Reporter()
    tasks = list(tasks or [base.task.name])
    plan(base, list(methods), tasks)  # fails before any training on unknown methods/tasks/data
    runs = []
    for task in tasks:
        for method in methods:
            config = variant(base, task, method)
            folder = out / "runs" / f"{task}-{method}-{config_key(config)}"
            if is_finished(folder, config):
                reporter.message(f"{task} · {method}: reusing {folder}")
            elif is_started(folder, config):
                reporter.message(f"{task} · {method}: resuming {folder}")
                runner(config, folder, resume=True, reporter=reporter)
            else:
                reporter.message(f"{task} · {method}: running into {folder}")
                runner(config, folder, overwrite=True, reporter=reporter)
            runs.append(RunRef(task, method, folder))
    write_report(runs, out)
    return runs
