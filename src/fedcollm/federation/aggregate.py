"""Aggregation of client adapters: FedAvg's example-weighted mean."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedcollm.errors import FedcollmError
from fedcollm.protocol import Arrays, ClientReply


class AggregationError(FedcollmError, ValueError):
    """Uploads that cannot be combined: none at all, zero total weight, or mismatched arrays."""


def weighted_mean(replies: Sequence[ClientReply]) -> Arrays:
    """Mean of the clients' arrays weighted by their example counts (McMahan et al., 2017).

    Accumulates in float64 so the result does not depend on the order clients arrive in beyond
    float64 rounding; returns float32 arrays with the first reply's names and shapes.
    """
    if not replies:
        raise AggregationError("no client replies to aggregate")
    total = sum(r.num_examples for r in replies)
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
        for reply in replies:
            shape = reply.arrays[name].shape
            if shape != acc.shape:
                raise AggregationError(
                    f"client {reply.client}: {name} has shape {shape}, expected {acc.shape}"
                )
            acc += reply.arrays[name].astype(np.float64) * (reply.num_examples / total)
        out[name] = acc.astype(np.float32)
    return out
