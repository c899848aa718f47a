"""Run one experiment end to end: load, train, evaluate, record.

`engine="local"` (default) runs every party in this process; `engine="flower"` runs the same
experiment on Flower's simulation engine (`fedcollm.engines.flower`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fedcollm.algorithms import ALGORITHMS, Algorithm
from fedcollm.config import ExperimentConfig
from fedcollm.engines.local import InProcessTransport
from fedcollm.experiment.loop import run_rounds
from fedcollm.experiment.recording import RunRecorder
from fedcollm.parties.runtime import (
    ClientRuntime,
    ExperimentData,
    Reporter,
    ServerRuntime,
    load_client_models,
    load_models,
)

if TYPE_CHECKING:
    from fedcollm.engines.flower import FlowerOptions


def run_experiment(
    config: ExperimentConfig,
    out: Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    reporter: Reporter | None = None,
    engine: Literal["local", "flower"] = "local",
    flower: FlowerOptions | None = None,
) -> RunRecorder:
    """Run `config` and write its run folder to `out` (`flower`: options of the Flower engine).

    With `resume`, continue the run in `out` from its newest checkpoint (the folder must hold
    the same experiment; without a checkpoint the run starts from the beginning).
    """
    if engine == "flower":
        from fedcollm.engines.flower import run_simulation

        return run_simulation(config, out, flower, overwrite=overwrite, resume=resume, reporter=reporter)
    if engine != "local":
        raise ValueError(f"unknown engine {engine!r}; use 'local' or 'flower'")
    reporter = reporter or Reporter()
    algorithm, server, recorder = prepare_server(
        config, out, overwrite=overwrite, resume=resume, reporter=reporter
    )
    client_models = load_client_models(config, server.slm)
    clients = [ClientRuntime.create(config, server.data, k, lm) for k, lm in enumerate(client_models)]
    transport = InProcessTransport(algorithm, clients, reporter)
    run_rounds(algorithm, server, transport, recorder, reporter, resume=resume)
    return recorder


def prepare_server(
    config: ExperimentConfig, out: Path, *, overwrite: bool, reporter: Reporter, resume: bool = False
) -> tuple[Algorithm, ServerRuntime, RunRecorder]:
    """The algorithm, the server's runtime and the run folder: what every engine starts from."""
    algorithm = ALGORITHMS[config.algorithm](config)
    reporter.phase("loading data")
    data = ExperimentData.load(config)
    recorder = RunRecorder(out, config, overwrite=overwrite, resume=resume)
    reporter.phase("loading models")
    slm, llm = load_models(config, with_llm=algorithm.uses_llm)
    return algorithm, ServerRuntime.create(config, data, slm, llm, run_dir=out), recorder
