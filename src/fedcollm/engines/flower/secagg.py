"""SecAgg+ for adapter uploads: settings derived from the round, validated, and checked after.

Flower's SecAgg+ (legacy `SecAggPlusWorkflow` + client `secaggplus_mod`) sums integer vectors
under pairwise masks; each client first multiplies its parameters by `w = n / max_weight`, clips
them to [-clipping_range, clipping_range] and quantises them to `quantization_range` levels. Two
silent failure modes follow, both measured on this machine: a clipping range below the largest
|w * value| corrupts the mean (41% error seen), and sums above the modulus wrap around. Nothing
in Flower checks either. Here:

1. Each client trains first (message `train.local` with `hold`), keeps its adapter in its node
   state and reports its example count and a power-of-two bound on its largest |value|.
2. `derive_settings` picks max_weight = the largest example count, clipping_range = the largest
   w_k * bound_k (so nothing is ever clipped) and the largest quantisation range that cannot
   overflow the modulus; explicit settings are validated against the same limits.
3. SecAgg+ runs; the server receives only the weighted mean.
4. `error_bound` gives a guaranteed bound on the quantisation error of that mean; an aggregate
   whose bound exceeds the tolerance (relative, L2) is refused, naming the setting to change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from logging import WARNING, getLogger

import numpy as np

from fedcollm.engines.flower.options import FlowerEngineError, FlowerOptions


class SecAggSettingsError(FlowerEngineError):
    """SecAgg+ settings that would corrupt or lose the aggregate."""


@dataclass(frozen=True)
class ClientStats:
    """What a client discloses in plain before SecAgg+: its weight and a magnitude bound."""

    node_id: int
    client: int
    num_examples: int
    bound: float


@dataclass(frozen=True)
class SecAggSettings:
    """One round's SecAgg+ parameters, and the numbers the error bound needs."""

    clipping_range: float
    quantization_range: int
    modulus_range: int
    max_weight: float
    num_shares: int | float
    threshold: int | float
    weights: tuple[float, ...]
    """Each client's effective weight q_ratio / quantization_range, as SecAgg+ applies it."""
    exact_weights: tuple[float, ...]
    """Each client's exact weight n / max_weight (what plain FedAvg would use)."""
    bounds: tuple[float, ...]
    """Each client's reported magnitude bound."""

    @property
    def step(self) -> float:
        """Width of one quantisation level in parameter units (before dividing by the weights)."""
        return 2 * self.clipping_range / self.quantization_range


def effective_weight(num_examples: int, max_weight: float, quantization_range: int) -> float:
    """The weight SecAgg+ really applies: w = n / max_weight rounded to 1 / quantization_range."""
    return round(num_examples / max_weight * quantization_range) / quantization_range


def derive_settings(stats: Sequence[ClientStats], options: FlowerOptions) -> SecAggSettings:
    """SecAgg+ parameters for these clients, from their example counts and magnitude bounds."""
    if len(stats) < 2:
        raise SecAggSettingsError(f"SecAgg+ needs at least 2 clients in a round, got {len(stats)}")
    k = len(stats)
    modulus = options.secagg_modulus_range
    largest = max(s.num_examples for s in stats)
    if largest <= 0:
        raise SecAggSettingsError("every client reported zero training examples")
    max_weight = options.secagg_max_weight or float(largest)

    # Each client's masked vector holds values in [0, Q] plus its weight factor q_ratio; the
    # server sums K of them modulo M, so K * max(Q, q_ratio) must stay below M. (Flower's
    # stochastic rounding also casts to int32, so Q <= 2**30.)
    heaviest = largest / max_weight
    if options.secagg_quantization_range:
        q_range = options.secagg_quantization_range
        worst = k * q_range * max(1.0, heaviest)
        if worst >= modulus:
            raise SecAggSettingsError(
                f"secagg-quantization-range={q_range} with {k} clients (max weight ratio "
                f"{heaviest:.3g}) can reach {worst:.3g} >= secagg-modulus-range={modulus}: the "
                f"masked sum would wrap around. Lower secagg-quantization-range below "
                f"{modulus / (k * max(1.0, heaviest)):.0f} (or set it to 0 to derive it)"
                + (", or raise secagg-max-weight" if heaviest > 1 else "")
            )
    else:
        limit = (modulus - 1) / (k * max(1.0, heaviest))
        q_range = 2 ** min(30, math.floor(math.log2(limit)))
        if q_range < 2**8:
            raise SecAggSettingsError(
                f"{k} clients leave only {q_range} quantisation levels under modulus {modulus}; "
                "raise secagg-max-weight or use fewer clients per round"
            )
    if q_range > 2**30:
        raise SecAggSettingsError(
            f"secagg-quantization-range={q_range} exceeds 2**30, the int32 range Flower's "
            "quantiser rounds into; lower it (or set it to 0 to derive it)"
        )

    weights = tuple(effective_weight(s.num_examples, max_weight, q_range) for s in stats)
    for s, w in zip(stats, weights, strict=True):
        if w <= 0:
            raise SecAggSettingsError(
                f"client {s.client}'s weight {s.num_examples}/{max_weight:g} rounds to zero at "
                f"quantisation range {q_range}: lower secagg-max-weight (or set it to 0)"
            )
    needed = max(s.bound * w for s, w in zip(stats, weights, strict=True)) * (1 + 2**-20)
    if options.secagg_clipping_range:
        clipping = options.secagg_clipping_range
        if clipping < needed:
            raise SecAggSettingsError(
                f"secagg-clipping-range={clipping:g} is below {needed:.6g}, the largest "
                "weighted adapter value a client reported: SecAgg+ would clip the uploads and "
                "silently corrupt the mean. Raise secagg-clipping-range to at least "
                f"{needed:.6g} (or set it to 0 to derive it)"
            )
    else:
        clipping = needed
    return SecAggSettings(
        clipping_range=float(clipping),
        quantization_range=int(q_range),
        modulus_range=int(modulus),
        max_weight=float(max_weight),
        num_shares=_share_count(options.secagg_num_shares),
        threshold=_share_count(options.secagg_threshold),
        weights=weights,
        exact_weights=tuple(s.num_examples / max_weight for s in stats),
        bounds=tuple(s.bound for s in stats),
    )


def _share_count(value: float) -> int | float:
    """Run config numbers arrive as floats; whole numbers above 1 mean counts, as in Flower."""
    if value > 1 and float(value).is_integer():
        return int(value)
    return float(value)


def error_bound(settings: SecAggSettings, num_params: int) -> float:
    """A guaranteed bound on the L2 error of the securely aggregated mean.

    Every client's stochastic rounding is off by less than one level (`step`) per value; the
    server divides the sum of K such errors by the sum of the weights. On top, the weights are
    themselves rounded to 1 / quantization_range, which shifts the mean by at most the change
    in each normalised weight times that client's magnitude bound.
    """
    k = len(settings.weights)
    total, exact_total = sum(settings.weights), sum(settings.exact_weights)
    rounding = k * settings.step / total
    reweighting = sum(
        abs(w / total - e / exact_total) * b
        for w, e, b in zip(settings.weights, settings.exact_weights, settings.bounds, strict=True)
    )
    # (1 + 1e-6): float64 arithmetic in the quantiser, ~1e-7 of a level at 2**30 levels.
    return (rounding * (1 + 1e-6) + reweighting) * math.sqrt(num_params)


def check_aggregate(settings: SecAggSettings, aggregate: dict[str, np.ndarray], tolerance: float) -> float:
    """Relative error bound of `aggregate`; raises if it exceeds `tolerance`."""
    num_params = sum(int(a.size) for a in aggregate.values())
    norm = math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in aggregate.values()))
    bound = error_bound(settings, num_params)
    relative = bound / norm if norm > 0 else math.inf
    if not relative <= tolerance:
        raise SecAggSettingsError(
            f"the securely aggregated adapter may be off by {relative:.3g} (relative L2), above "
            f"secagg-tolerance={tolerance:g}: refusing it. Raise secagg-quantization-range "
            f"(now {settings.quantization_range}; at most modulus / clients), or lower "
            f"secagg-clipping-range (now {settings.clipping_range:.4g}) or secagg-max-weight "
            f"(now {settings.max_weight:g}) toward the derived values (set them to 0)"
        )
    return relative


def quiet_secagg_logs() -> None:
    """SecAgg+ logs every stage at INFO; keep Flower's logger at WARNING unless verbose."""
    getLogger("flwr").setLevel(WARNING)
