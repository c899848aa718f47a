"""Engines move an experiment's messages; the algorithm and the round loop are the same on each.

- `local` (default): the embedded engine, every party in this process (`fedcollm.engines.local`).
- `flower`: Flower's simulation engine on this machine (`fedcollm.engines.flower`); Flower's
  deployment engine runs the same ServerApp and ClientApp across machines (`fedcollm deploy`).

`run_experiment` is the entry point of a whole run. This module imports no engine until one is
asked for: the Flower ClientApp's processes import `fedcollm.engines.flower` without the model
stack.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fedcollm.config import ConfigError, ExperimentConfig
from fedcollm.protocol import Reporter

if TYPE_CHECKING:
    from fedcollm.engines.flower.options import FlowerOptions
    from fedcollm.evaluation.baselines import BaselineStore
    from fedcollm.experiment.recording import RunRecorder

EngineName = Literal["local", "flower"]


def _local(
    config: ExperimentConfig,
    out: Path,
    *,
    overwrite: bool,
    resume: bool,
    reporter: Reporter | None,
    flower: FlowerOptions | None,
    baselines: BaselineStore | None,
) -> RunRecorder:
    from fedcollm.engines.local import run_local

    return run_local(config, out, overwrite=overwrite, resume=resume, reporter=reporter, baselines=baselines)


def _flower(
    config: ExperimentConfig,
    out: Path,
    *,
    overwrite: bool,
    resume: bool,
    reporter: Reporter | None,
    flower: FlowerOptions | None,
    baselines: BaselineStore | None,
) -> RunRecorder:
    from fedcollm.engines.flower.simulation import run_simulation

    return run_simulation(
        config, out, flower, overwrite=overwrite, resume=resume, reporter=reporter, baselines=baselines
    )


ENGINES: dict[str, Callable[..., RunRecorder]] = {"local": _local, "flower": _flower}
"""Engine name -> runner (the keys are `EngineName`)."""


def run_experiment(
    config: ExperimentConfig,
    out: Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    reporter: Reporter | None = None,
    engine: EngineName = "local",
    flower: FlowerOptions | None = None,
    baselines: BaselineStore | None = None,
) -> RunRecorder:
    """Run `config` on `engine` and write its run folder to `out` (`flower`: Flower engine options).

    With `resume`, continue the run in `out` from its newest checkpoint (the folder must hold
    the same experiment; without a checkpoint the run starts from the beginning). `baselines`:
    a store of base-model evaluations shared across runs (`fedcollm compare` passes one).
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; available: {', '.join(ENGINES)}")
    return ENGINES[engine](
        config, out, overwrite=overwrite, resume=resume, reporter=reporter, flower=flower, baselines=baselines
    )
