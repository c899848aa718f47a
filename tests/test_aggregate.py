"""FedAvg weighting."""

from __future__ import annotations

import numpy as np
import pytest

from fedcollm.federation.aggregate import weighted_mean
from fedcollm.protocol import ClientReply


def _reply(client: int, value: float, n: int) -> ClientReply:
    return ClientReply(
        client, {"a": np.full((2, 3), value, np.float32), "b": np.full(4, -value, np.float32)}, n
    )


def test_weighted_mean_weights_by_example_count() -> None:
    out = weighted_mean([_reply(0, 1.0, 1), _reply(1, 4.0, 3)])
    np.testing.assert_allclose(out["a"], np.full((2, 3), (1 * 1 + 4 * 3) / 4))
    np.testing.assert_allclose(out["b"], np.full(4, -(1 * 1 + 4 * 3) / 4))
    assert out["a"].dtype == np.float32


def test_equal_counts_give_the_plain_mean() -> None:
    out = weighted_mean([_reply(0, 1.0, 5), _reply(1, 2.0, 5), _reply(2, 6.0, 5)])
    np.testing.assert_allclose(out["a"], 3.0)


def test_mismatched_uploads_are_refused_naming_the_client() -> None:
    bad = ClientReply(7, {"a": np.zeros((3, 3), np.float32), "b": np.zeros(4, np.float32)}, 1)
    with pytest.raises(ValueError, match="client 7"):
        weighted_mean([_reply(0, 1.0, 1), bad])
    with pytest.raises(ValueError, match="zero"):
        weighted_mean([_reply(0, 1.0, 0)])
