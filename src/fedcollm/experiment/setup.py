"""What every engine starts a run from: the checked config, the algorithm, the server, the run folder.

The order is the point: the config is checked against its algorithm before anything is read,
the data and the model names before any model loads, and the run folder is claimed only once
all of them are known to be usable, so a run that cannot work fails in seconds and leaves
nothing half-written. `--dry-run` (`fedcollm.experiment.plan`) runs the same checks.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fedcollm.algorithms import ALGORITHMS, Algorithm, check_config
from fedcollm.config import ConfigError, ExperimentConfig
from fedcollm.experiment.memory import memory_plan, refuse_what_does_not_fit
from fedcollm.experiment.recording import RunRecorder
from fedcollm.lm.loading import resolve_model
from fedcollm.parties.data import ExperimentData
from fedcollm.parties.loading import load_models
from fedcollm.parties.resources import SharedResources
from fedcollm.parties.server import ServerRuntime
from fedcollm.protocol import Reporter


def check_data(algorithm: type[Algorithm], config: ExperimentConfig, data: ExperimentData) -> None:
    """Refuse data the algorithm cannot work with (an auxiliary set left empty by a small split)."""
    if algorithm.needs_auxiliary_set(config) and not data.aux_records():
        where = (
            f"task.aux_data ({config.task.aux_data}) holds no examples"
            if config.task.aux_data
            else f"task.aux_fraction={config.task.aux_fraction} of {len(data.train)} training "
            f"{data.family.record_name}s "
            "leaves it empty: raise task.aux_fraction or task.train_limit"
        )
        raise ConfigError(f"algorithm {config.algorithm!r} trains on the server's auxiliary set, but {where}")


def check_models(config: ExperimentConfig, algorithms: Iterable[type[Algorithm]]) -> None:
    """Refuse a model name that can never load (SLM, every client's, and the LLM if one is used).

    Resolution reads no weights (an offline alias is converted once, as loading would anyway);
    a hub id passes here and is fetched when it loads.
    """
    fed = config.federation
    names = {config.slm.name} | {fed.client_model(k, config.slm.name) for k in range(fed.num_clients)}
    if config.llm is not None and any(algorithm.uses_llm for algorithm in algorithms):
        names.add(config.llm.name)
    for name in sorted(names):
        resolve_model(name)


def prepare_server(
    config: ExperimentConfig,
    out: Path,
    *,
    overwrite: bool,
    reporter: Reporter,
    resume: bool = False,
    resources: SharedResources | None = None,
    secure_aggregation: bool = False,
) -> tuple[Algorithm, ServerRuntime, RunRecorder]:
    """The algorithm, the server's runtime and the run folder: what every engine starts from.

    `secure_aggregation`: the engine's transport aggregates securely (the config is checked for it).
    """
    check_config(config, secure_aggregation=secure_aggregation)
    algorithm = ALGORITHMS[config.algorithm](config)
    reporter.phase("loading data")
    data = ExperimentData.load(config)
    check_data(type(algorithm), config, data)
    check_models(config, [type(algorithm)])
    memory, _ = memory_plan(config, type(algorithm), data)
    refuse_what_does_not_fit(memory)  # before any weight loads or the run folder is claimed
    recorder = RunRecorder(out, config, overwrite=overwrite, resume=resume)
    reporter.phase("loading models")
    slm, llm = load_models(config, with_llm=algorithm.uses_llm)
    server = ServerRuntime.create(config, data, slm, llm, run_dir=out, resources=resources)
    return algorithm, server, recorder
