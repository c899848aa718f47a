"""Run one experiment end to end on the embedded engine: load, train, evaluate, record."""

from __future__ import annotations

from pathlib import Path

from fedcollm.algorithms import ALGORITHMS
from fedcollm.config import ExperimentConfig
from fedcollm.engines.local import InProcessTransport
from fedcollm.loop import run_rounds
from fedcollm.recording import RunRecorder
from fedcollm.runtime import (
    ClientRuntime,
    ExperimentData,
    Reporter,
    ServerRuntime,
    load_client_models,
    load_models,
)


def run_experiment(
    config: ExperimentConfig,
    out: Path,
    *,
    overwrite: bool = False,
    reporter: Reporter | None = None,
) -> RunRecorder:
    """Run `config` in this process and write its run folder to `out`."""
    reporter = reporter or Reporter()
    algorithm = ALGORITHMS[config.algorithm](config)
    reporter.phase("loading data")
    data = ExperimentData.load(config)
    recorder = RunRecorder(out, config, overwrite=overwrite)
    reporter.phase("loading models")
    slm, llm = load_models(config, with_llm=algorithm.uses_llm)
    server = ServerRuntime.create(config, data, slm, llm)
    client_models = load_client_models(config, slm)
    clients = [ClientRuntime.create(config, data, k, lm) for k, lm in enumerate(client_models)]
    run_rounds(algorithm, server, InProcessTransport(algorithm, clients, reporter), recorder, reporter)
    return recorder
