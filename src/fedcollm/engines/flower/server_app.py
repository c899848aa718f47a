"""The ServerApp: the server's side of a fedcollm run on Flower.

It runs the same round loop as the embedded engine (`fedcollm.experiment.loop.run_rounds`) with a
`FlowerTransport` in place of the in-process one, so evaluation, aggregation, the algorithm's
server step and the run folder are exactly those of `fedcollm run`.

`app` is what `[tool.flwr.app.components] serverapp` names: it reads the experiment from the
run config (`experiment` = path to the TOML, `set` = space-separated overrides, `out` = run
folder; relative paths resolve against the SuperLink's working directory) plus the engine
options of `FlowerOptions`. The simulation (`fedcollm run --engine flower`) wraps `serve` around
an already-loaded config instead.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcollm.engines.flower.options import FlowerOptions
from fedcollm.protocol import Reporter

if TYPE_CHECKING:
    from fedcollm.config import ExperimentConfig
    from fedcollm.experiment.recording import RunRecorder
    from fedcollm.parties.resources import SharedResources


def serve(
    grid: Grid,
    config: ExperimentConfig,
    out: Path,
    options: FlowerOptions,
    *,
    overwrite: bool = False,
    resume: bool = False,
    reporter: Reporter | None = None,
    resources: SharedResources | None = None,
) -> RunRecorder:
    """Run `config` with the clients on the other end of `grid`; write the run folder to `out`."""
    from fedcollm.engines.flower.transport import FlowerTransport
    from fedcollm.experiment.loop import run_rounds
    from fedcollm.experiment.setup import prepare_server

    reporter = reporter or Reporter()
    algorithm, server, recorder = prepare_server(
        config,
        out,
        overwrite=overwrite,
        resume=resume,
        reporter=reporter,
        resources=resources,
        secure_aggregation=options.secagg,
    )
    transport = FlowerTransport(grid, config, options, reporter, recorder)
    try:
        if algorithm.uses_clients:
            transport.connect()
        run_rounds(algorithm, server, transport, recorder, reporter, resume=resume)
    finally:
        transport.release()
    return recorder


def experiment_from_run_config(run_config: Mapping[str, Any]) -> tuple[ExperimentConfig, Path, bool]:
    """The experiment, run folder and overwrite flag named by a Flower run config."""
    from fedcollm.config import ConfigError, load_config

    path = str(run_config.get("experiment", "")).strip()
    if not path:
        raise ConfigError(
            "no experiment given: pass --run-config 'experiment=\"/path/to/config.toml\"' to flwr run"
        )
    overrides = shlex.split(str(run_config.get("set", "")))
    config = load_config(Path(path).expanduser(), overrides)
    out = str(run_config.get("out", "")).strip()
    return (
        config,
        Path(out).expanduser() if out else Path("runs") / config.name,
        bool(run_config.get("overwrite", False)),
    )


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run`: experiment and options come from the run config."""
    import logging
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    config, out, overwrite = experiment_from_run_config(context.run_config)
    options = FlowerOptions.from_run_config(context.run_config)
    if not options.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    resume = bool(context.run_config.get("resume", False))
    reporter = _LogReporter()
    import torch

    reporter.message(
        f"ServerApp process {os.getpid()}: torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    serve(grid, config, out, options, overwrite=overwrite, resume=resume, reporter=reporter)


class _LogReporter(Reporter):
    """Writes phases and messages, time-stamped, to the ServerApp's log (`flwr log RUN_ID`)."""

    def phase(self, description: str, total: int | None = None) -> None:
        self.message(description)

    def message(self, text: str) -> None:
        import time

        now = time.time()
        stamp = time.strftime("%H:%M:%S", time.localtime(now))
        print(f"{stamp}.{int(now * 1000) % 1000:03d} {text}", flush=True)
