"""`fedcollm run --engine flower`: the experiment on Flower's simulation engine, on this machine.

The ServerApp runs in a thread of this process (it writes the run folder as the embedded engine
does); K virtual SuperNodes run the ClientApp in Ray actors, each actor loading its own SLM.
Flower's home folder is `<out>/.flwr`, telemetry and runtime dependency installation are off, and
Ray is shut down when the run ends, whether it succeeds or fails.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcollm.engines.flower.options import FlowerOptions, FlowerOptionsError

if TYPE_CHECKING:
    from fedcollm.config import ExperimentConfig
    from fedcollm.evaluation.baselines import BaselineStore
    from fedcollm.experiment.recording import RunRecorder
    from fedcollm.protocol import Reporter

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
}


def simulation_gpus(options: FlowerOptions) -> int:
    """The GPUs Ray may hand out: every visible one when clients take GPU shares, else none.

    A GPU share asked for on a machine without CUDA is refused here, before Ray would wait
    forever for a resource that never comes.
    """
    if options.gpus_per_client <= 0:
        return 0
    import torch

    if not torch.cuda.is_available():
        raise FlowerOptionsError(
            f"gpus-per-client={options.gpus_per_client}: this machine has no CUDA GPU; leave it at 0"
        )
    return torch.cuda.device_count()


@contextmanager
def flower_environment(flwr_home: Path) -> Iterator[None]:
    """Environment for an in-process Flower run; restores the previous one afterwards."""
    changes = {**FLOWER_ENV, "FLWR_HOME": str(flwr_home.resolve())}
    saved = {key: os.environ.get(key) for key in [*changes, "PYTHONPATH"]}
    flwr_home.mkdir(parents=True, exist_ok=True)
    os.environ.update(changes)
    telemetry = sys.modules.get("flwr.supercore.telemetry")
    if telemetry is not None:  # imported before the variable was set: it read "1" then
        telemetry.FLWR_TELEMETRY_ENABLED = "0"  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_simulation(
    config: ExperimentConfig,
    out: Path,
    options: FlowerOptions | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    reporter: Reporter | None = None,
    baselines: BaselineStore | None = None,
) -> RunRecorder:
    """Run `config` on Flower's simulation engine; write the run folder to `out`.

    `baselines`: where the ServerApp (in this process) keeps base-model evaluations across runs;
    the ClientApps, in their own processes, evaluate their own.
    """

    from fedcollm.algorithms import check_config

    # Ray's actors serve every message of the run in one process each: no node workers.
    options = replace(options or FlowerOptions(), node_worker=False)
    # Before Ray starts: a config SecAgg+ cannot run stops here (the ServerApp checks it again).
    check_config(config, secure_aggregation=options.secagg)
    recorder: list[RunRecorder] = []

    with flower_environment(out / ".flwr"):
        from flwr.app import Context
        from flwr.serverapp import Grid, ServerApp
        from flwr.simulation import run_simulation as flower_run_simulation

        from fedcollm.engines.flower.client_app import app as client_app
        from fedcollm.engines.flower.server_app import serve
        from fedcollm.parties.resources import SharedResources

        server_app = ServerApp()

        @server_app.main()
        def main(grid: Grid, context: Context) -> None:
            recorder.append(
                serve(
                    grid,
                    config,
                    out,
                    options,
                    overwrite=overwrite,
                    resume=resume,
                    reporter=reporter,
                    resources=SharedResources(baselines=baselines),
                )
            )

        cores = os.cpu_count() or 1
        backend_config: dict[str, Any] = {
            "client_resources": {"num_cpus": options.cpus_per_client, "num_gpus": options.gpus_per_client},
            "init_args": {
                "num_cpus": cores,
                "num_gpus": simulation_gpus(options),
                "logging_level": "INFO" if options.verbose else "ERROR",
                "log_to_driver": options.verbose,
            },
        }
        flwr_logger = logging.getLogger("flwr")
        level = flwr_logger.level
        if not options.verbose:
            flwr_logger.setLevel(logging.WARNING)
        try:
            flower_run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=config.federation.num_clients,
                backend_config=backend_config,
                verbose_logging=options.verbose,
            )
        finally:
            flwr_logger.setLevel(level)
            _shutdown_ray()
    if not recorder:
        raise RuntimeError("the Flower simulation ended without running the experiment")
    return recorder[0]


def _shutdown_ray() -> None:
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()
