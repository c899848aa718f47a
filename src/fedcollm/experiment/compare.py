"""Run several methods on several tasks with identical partition, seeds and evaluation set.

Each (task, method) run is an ordinary run folder under `<out>/runs/`, named by a hash of its
resolved configuration: a finished run with the same configuration is reused, not redone. The
runs go through a `Runner` the caller passes (`fedcollm.engines.run_experiment` from the
command line), so a comparison runs on any engine. Every run shares the comparison's
`BaselineStore` (`<out>/baselines/`): each base model is evaluated once per task and evaluation
set, and the Zero-Shot row and every method's round 0 read that one evaluation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from fedcollm.config import PAPER_METHODS, ConfigError, ExperimentConfig
from fedcollm.data.families import task_family
from fedcollm.evaluation.baselines import BaselineStore
from fedcollm.experiment.checkpoint import CHECKPOINT_DIR
from fedcollm.experiment.plan import plan, variant, with_seed
from fedcollm.experiment.report import RunRef, write_report
from fedcollm.protocol import Reporter

BASELINES_DIR = "baselines"
"""The comparison folder's store of base-model evaluations (`BaselineStore`)."""


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
        baselines: BaselineStore | None = None,
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
    seeds: Sequence[int] | None = None,
) -> list[RunRef]:
    """Run (or reuse) every method on every task, once per seed, then write the report to `out`.

    `seeds` (default: `compare.seeds`, else the base experiment's seed alone): each seed moves
    the partition, LoRA initialisation, shuffling and dropout; every seed is scored on the same
    evaluation questions (`with_seed`).
    """
    reporter = reporter or Reporter()
    tasks = list(tasks or [base.task.name])
    seeds = list(seeds or base.compare.seeds or [base.seed])
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"compare seeds {seeds} repeat a seed; list each once")
    free_text = [t for t in tasks if task_family(t).kind != "multiple_choice"]
    if free_text:
        raise ConfigError(
            f"fedcollm compare pairs methods question by question on multiple-choice tasks; "
            f"{', '.join(free_text)} is answered in free text: run each method with fedcollm run, "
            "whose results.md holds the paired before/after (docs/statistics.md)"
        )
    plan(base, list(methods), tasks)  # fails before any training on unknown methods/tasks/data
    runs = []
    baselines = BaselineStore(out / BASELINES_DIR)
    for seed in seeds:
        seeded = with_seed(base, seed)
        for task in tasks:
            for method in methods:
                config = variant(seeded, task, method)
                folder = out / "runs" / f"{task}-{method}-{config_key(config)}"
                what = f"{task} · {method}" + (f" · seed {seed}" if len(seeds) > 1 else "")
                if is_finished(folder, config):
                    reporter.message(f"{what}: reusing {folder}")
                elif is_started(folder, config):
                    reporter.message(f"{what}: resuming {folder}")
                    runner(config, folder, resume=True, reporter=reporter, baselines=baselines)
                else:
                    reporter.message(f"{what}: running into {folder}")
                    runner(config, folder, overwrite=True, reporter=reporter, baselines=baselines)
                runs.append(RunRef(task, method, folder, seed))
    write_report(runs, out)
    return runs
