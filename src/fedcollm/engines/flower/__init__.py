"""The Flower engine: the same experiments on Flower (`flwr`) — simulation, deployment, SecAgg+.

- `client_app.app` / `server_app.app`: the Flower App declared in `pyproject.toml`
  (`[tool.flwr.app.components]`), runnable with `flwr run`.
- `run_simulation`: `fedcollm run CONFIG --engine flower` (Flower's simulation engine).
- `deploy`: SuperLink + K SuperNodes as separate processes (`fedcollm deploy`), TLS certificates.
- `transport.FlowerTransport`: the `Transport` the round loop uses; `secagg`: all of SecAgg+
  (settings, error bound, the server workflow and the client's held upload); `records`: the
  messages.

Nothing here implements an algorithm: the ClientApp calls the algorithm's `client_fit`, the
ServerApp runs `fedcollm.experiment.loop.run_rounds`, exactly as the embedded engine does.
"""

import os

# The one deliberate import-time effect: Flower reads this once, when its telemetry module is first
# imported, so fedcollm's Flower engine opts out of telemetry before anything imports flwr (a user's
# explicit setting wins).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fedcollm.engines.flower.options import FlowerEngineError, FlowerOptions
from fedcollm.engines.flower.simulation import run_simulation

__all__ = ["FlowerEngineError", "FlowerOptions", "run_simulation"]
