"""Aggregation of client adapters: FedAvg's weighted mean, weighted as `federation.weighting` says."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedcollm.config import Weighting
from fedcollm.errors import FedcollmError
from fedcollm.protocol import Arrays, ClientReply


class AggregationError(FedcollmError, ValueError):
    """Uploads that cannot be combined: none at all, zero total weight, or mismatched arrays."""


def upload_weight(num_examples: int, weighting: Weighting) -> int:
    """The weight an upload from `num_examples` examples carries in the mean: the one place it is decided.

    "examples": the example count (FedAvg, McMahan et al., 2017); "uniform": 1, so K uploads
    each count 1/K (the FedCoLLM paper's Algorithm 1, line 13). An upload of no examples carries
    no weight under either. The server's mean (`weighted_mean`) and SecAgg+, where every client
    weights its own upload before masking it, both take their weights from here, so the two
    aggregates agree up to SecAgg+'s quantisation.
    """
    if weighting == "examples":
        return num_examples
    return 1 if num_examples > 0 else 0


def weighted_mean(replies: Sequence[ClientReply], weighting: Weighting = "examples") -> Arrays:
    """Mean of the clients' arrays, each weighted by `upload_weight` (default: its example count).

    Accumulates in float64 so the result does not depend on the order clients arrive in beyond
    float64 rounding; returns float32 arrays with the first reply's names and shapes.
    """
    if not replies:
        raise AggregationError("no client replies to aggregate")
    weights = [upload_weight(r.num_examples, weighting) for r in replies]
    total = sum(weights)
    if total <= 0:
        raise AggregationError("client example counts sum to zero; cannot weight the average")
    names = list(replies[0].arrays)
    for reply in replies[1:]:
        if list(reply.arrays) != names:
            raise AggregationError(
                f"client {reply.client} sent different adapter names than client {replies[0].client}"
            )
    out: Arrays = {}
    for name in names:
        acc = np.zeros(replies[0].arrays[name].shape, dtype=np.float64)
        for reply, weight in zip(replies, weights, strict=True):
            shape = reply.arrays[name].shape
            if shape != acc.shape:
                raise AggregationError(
                    f"client {reply.client}: {name} has shape {shape}, expected {acc.shape}"
                )
            acc += reply.arrays[name].astype(np.float64) * (weight / total)
        out[name] = acc.astype(np.float32)
    return out
