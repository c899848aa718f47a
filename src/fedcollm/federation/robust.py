"""Checks on what clients upload, and aggregation rules that survive a poisoned client.

The server must not trust uploads: every adapter is checked against the expected names, shapes
and dtypes, for NaN/Inf, and for an update norm far outside the other clients' before it touches
the aggregate. For users who expect poisoned clients, coordinate-wise median and trimmed mean
replace the mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedcollm.config import Weighting
from fedcollm.federation.aggregate import AggregationError, weighted_mean
from fedcollm.protocol import Arrays, ClientReply

FLOAT_DTYPES = (np.float32, np.float16)


@dataclass(frozen=True)
class Rejection:
    """An upload refused by the server, and why."""

    client: int
    reason: str


def check_upload(reply: ClientReply, expected: Mapping[str, np.ndarray]) -> str | None:
    """The reason an adapter upload is malformed, or None if it is well-formed."""
    missing = sorted(set(expected) - set(reply.arrays))
    extra = sorted(set(reply.arrays) - set(expected))
    if missing or extra:
        return f"adapter names differ from the expected ones (missing {missing[:2]}, unexpected {extra[:2]})"
    for name, ref in expected.items():
        value = reply.arrays[name]
        if not isinstance(value, np.ndarray) or value.dtype.type not in FLOAT_DTYPES:
            return f"{name}: dtype {getattr(value, 'dtype', type(value).__name__)} is not float32/float16"
        if value.shape != ref.shape:
            return f"{name}: shape {value.shape} != expected {ref.shape}"
        if not np.isfinite(value).all():
            return f"{name}: contains NaN or Inf"
    if reply.num_examples <= 0:
        return f"example count {reply.num_examples} is not positive"
    return None


def update_norm(reply: ClientReply, reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of the client's change to the adapter it started from."""
    total = 0.0
    for name, ref in reference.items():
        diff = reply.arrays[name].astype(np.float64) - ref.astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return float(np.sqrt(total))


def screen_uploads(
    replies: Sequence[ClientReply],
    expected: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray] | None,
    norm_multiple: float,
) -> tuple[list[ClientReply], list[Rejection]]:
    """Split uploads into accepted and rejected ones.

    Malformed uploads are rejected first. Then, when `reference` (the adapter the clients
    started from) is given and at least three uploads remain, any update whose norm exceeds
    `norm_multiple` times the median update norm is rejected as an outlier. `norm_multiple <= 0`
    disables the norm check.
    """
    accepted: list[ClientReply] = []
    rejected: list[Rejection] = []
    for reply in replies:
        reason = check_upload(reply, expected)
        if reason is None:
            accepted.append(reply)
        else:
            rejected.append(Rejection(reply.client, reason))
    if reference is not None and norm_multiple > 0 and len(accepted) >= 3:
        norms = {reply.client: update_norm(reply, reference) for reply in accepted}
        median = float(np.median(list(norms.values())))
        bound = norm_multiple * median
        if median > 0:
            outliers = {k for k, n in norms.items() if n > bound}
            rejected += [
                Rejection(
                    k, f"update norm {norms[k]:.3g} exceeds {norm_multiple:g} x the median {median:.3g}"
                )
                for k in sorted(outliers)
            ]
            accepted = [reply for reply in accepted if reply.client not in outliers]
    return accepted, rejected


def _stack(replies: Sequence[ClientReply], name: str) -> np.ndarray:
    return np.stack([reply.arrays[name].astype(np.float64) for reply in replies])


def coordinate_median(replies: Sequence[ClientReply]) -> Arrays:
    """Coordinate-wise median of the uploads (Yin et al., 2018); ignores example counts."""
    if not replies:
        raise AggregationError("no client replies to aggregate")
    return {name: np.median(_stack(replies, name), axis=0).astype(np.float32) for name in replies[0].arrays}


def trimmed_mean(replies: Sequence[ClientReply], trim_fraction: float = 0.2) -> Arrays:
    """Coordinate-wise mean after dropping the `trim_fraction` largest and smallest values."""
    if not replies:
        raise AggregationError("no client replies to aggregate")
    cut = int(trim_fraction * len(replies))
    if 2 * cut >= len(replies):
        raise AggregationError(
            f"robustness.trim_fraction={trim_fraction} leaves no value among {len(replies)} clients"
        )
    out: Arrays = {}
    for name in replies[0].arrays:
        ordered = np.sort(_stack(replies, name), axis=0)
        out[name] = ordered[cut : len(replies) - cut].mean(axis=0).astype(np.float32)
    return out


class Aggregator(Protocol):
    """An aggregation rule: the uploads, `robustness.trim_fraction` and `federation.weighting` in."""

    def __call__(
        self, replies: Sequence[ClientReply], trim_fraction: float, weighting: Weighting = "examples"
    ) -> Arrays: ...


def _mean(replies: Sequence[ClientReply], trim_fraction: float, weighting: Weighting = "examples") -> Arrays:
    return weighted_mean(replies, weighting)


def _median(
    replies: Sequence[ClientReply], trim_fraction: float, weighting: Weighting = "examples"
) -> Arrays:
    return coordinate_median(replies)


def _trimmed(
    replies: Sequence[ClientReply], trim_fraction: float, weighting: Weighting = "examples"
) -> Arrays:
    return trimmed_mean(replies, trim_fraction)


AGGREGATORS: dict[str, Aggregator] = {"mean": _mean, "median": _median, "trimmed_mean": _trimmed}
"""Aggregation rules selectable by `robustness.aggregation`. Only the mean weighs the uploads (by
`federation.weighting`); median and trimmed mean count every upload alike under either weighting."""
