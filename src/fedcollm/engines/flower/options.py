"""Settings of the Flower engine that are not part of an experiment: how messages travel.

An experiment's TOML says *what* is computed; these settings say *how* it is moved (secure
aggregation or not, how long to wait for SuperNodes, how many clients a round needs). They reach
the ServerApp as Flower run config (`[tool.flwr.app.config]` in `pyproject.toml`, overridable with
`flwr run --run-config`), so every key here has a kebab-case run-config name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedcollm.errors import FedcollmError


class FlowerEngineError(FedcollmError, RuntimeError):
    """The Flower engine cannot continue; the message says why and what to change."""


class FlowerOptionsError(FedcollmError, ValueError):
    """A Flower engine option (run config key) with a value the engine cannot use."""


@dataclass(frozen=True)
class FlowerOptions:
    """How the Flower engine runs a round. Zero means 'derive it' for the SecAgg+ ranges."""

    secagg: bool = False
    """Aggregate adapter uploads with SecAgg+ (the server only ever sees their weighted mean)."""
    min_clients: int = 2
    """Fewest clients whose updates a round needs; below it the run stops with an error."""
    secagg_num_shares: float = 1.0
    """Shares per client secret: a float is a share of the round's clients, an int a count."""
    secagg_threshold: float = 0.6
    """Shares needed to reconstruct a secret (a float is a share of num_shares; at least 2)."""
    secagg_clipping_range: float = 0.0
    """|value| bound before quantisation; 0 = derived from the clients' reported bounds."""
    secagg_quantization_range: int = 0
    """Quantisation levels; 0 = the largest power of two that cannot overflow the modulus."""
    secagg_modulus_range: int = 2**32
    """Masking modulus (a power of two, at most 2**32 in Flower 1.42)."""
    secagg_max_weight: float = 0.0
    """Largest example count a client may weigh with; 0 = the round's largest example count."""
    secagg_tolerance: float = 1e-3
    """Refuse an aggregate whose quantisation error bound exceeds this (relative, L2)."""
    secagg_timeout: float = 0.0
    """Seconds each SecAgg+ stage waits for replies; 0 = until every node replied or was lost."""
    connect_timeout: float = 300.0
    """Seconds to wait for all K SuperNodes to connect at the start of a run."""
    round_timeout: float = 0.0
    """Seconds to wait for training replies; 0 = until every node replied or was lost."""
    cpus_per_client: float = 1.0
    """Simulation only: CPU cores reserved per ClientApp actor (2 cores here -> 2 actors)."""
    gpus_per_client: float = 0.0
    """Simulation only: share of a GPU reserved per ClientApp actor (0.25 = four clients side by
    side on each GPU; Ray gives each actor its GPU, where `device = "auto"` finds it); 0 = none."""
    node_worker: bool = True
    """Deployment: each SuperNode keeps one worker process per run that holds its client's SLM and
    data across messages (`node_worker`); false: every message loads them afresh in its own
    ClientApp process. The simulation never uses workers (its Ray actors live for the run)."""
    verbose: bool = False
    """Show Flower's own INFO logs."""

    def __post_init__(self) -> None:
        if self.min_clients < 1:
            raise FlowerOptionsError("min-clients must be at least 1")
        if self.secagg and self.min_clients < 2:
            raise FlowerOptionsError("SecAgg+ needs at least 2 clients per round: set min-clients >= 2")
        if not 0 < self.secagg_tolerance < 1:
            raise FlowerOptionsError("secagg-tolerance must be in (0, 1)")
        if self.secagg_modulus_range > 2**32 or bin(self.secagg_modulus_range).count("1") != 1:
            raise FlowerOptionsError("secagg-modulus-range must be a power of two no larger than 2**32")
        for name in (
            "gpus_per_client",
            "secagg_clipping_range",
            "secagg_max_weight",
            "secagg_timeout",
            "connect_timeout",
            "round_timeout",
            "secagg_quantization_range",
        ):
            if getattr(self, name) < 0:
                raise FlowerOptionsError(f"{run_config_key(name)} must not be negative")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], **defaults: Any) -> FlowerOptions:
        """Read the options from a Flower run config (kebab-case keys; others are ignored)."""
        values = dict(defaults)
        for f in fields(cls):
            key = run_config_key(f.name)
            if key in run_config:
                values[f.name] = _coerce(f.type, run_config[key], key)
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        return {run_config_key(f.name): getattr(self, f.name) for f in fields(self)}


def run_config_key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(annotation: Any, value: Any, key: str) -> Any:
    kind = str(annotation)
    try:
        if kind == "bool":
            if isinstance(value, str):
                return value.strip().lower() in {"1", "true", "yes", "on"}
            return bool(value)
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
    except (TypeError, ValueError):
        raise FlowerOptionsError(f"run config {key}={value!r}: expected {kind}") from None
    return value
