"""The registry of algorithms, by the name a config selects them with, and the config check.

`fedcollm.config.AlgorithmName` lists the same names as a closed type (the config never imports
the algorithms); a test keeps the two equal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedcollm.config import ConfigError, ExperimentConfig

if TYPE_CHECKING:
    from fedcollm.algorithms.base import Algorithm

ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make an algorithm selectable by its `name` in configs."""
    if cls.name in ALGORITHMS:
        raise ValueError(f"algorithm name {cls.name!r} registered twice")
    ALGORITHMS[cls.name] = cls
    return cls


def check_config(
    config: ExperimentConfig, origin: str | None = None, *, secure_aggregation: bool = False
) -> None:
    """Raise `ConfigError` listing every reason `config` cannot run its algorithm.

    `origin` names where the config came from in the message (default: the experiment's name).
    `secure_aggregation`: the engine will aggregate with SecAgg+ (the Flower engine's `secagg`
    option, which is not part of the experiment); settings that need the server to see each
    upload are then refused too, for the algorithms whose aggregate SecAgg+ computes. The run
    start, `--dry-run`, `fedcollm deploy` and the ServerApp all call this before anything loads.
    """
    algorithm = ALGORITHMS[config.algorithm]
    secure = []
    if algorithm.aggregates_securely(secure_aggregation):
        secure = algorithm.secure_aggregation_problems(config)
    problems = algorithm.check_config(config) + secure
    if problems:
        where = origin or f"experiment {config.name!r}"
        reasons = "\n".join(f"  - {problem}" for problem in problems)
        under = " with secure aggregation (SecAgg+)" if secure else ""
        raise ConfigError(f"{where} cannot run {config.algorithm!r}{under}:\n{reasons}")
