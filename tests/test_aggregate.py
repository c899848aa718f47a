"""FedAvg weighting: by example count (the default) or uniform (`federation.weighting`)."""

from __future__ import annotations

import numpy as np
import pytest

from fedcollm.algorithms import ALGORITHMS
from fedcollm.config import build_config
from fedcollm.federation.aggregate import upload_weight, weighted_mean
from fedcollm.federation.robust import AGGREGATORS
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


# ------------------------------------------------------------------------------------------
# federation.weighting: "examples" (FedAvg, the default) or "uniform" (FedCoLLM's Algorithm 1, l. 13)

UNEQUAL = [(0, 1.0, 1), (1, 4.0, 3), (2, 7.0, 8)]
"""Three uploads with unequal example counts: plain mean 4, example-weighted mean 69/12."""


def test_uniform_weighting_is_the_plain_mean_and_examples_stays_the_default() -> None:
    replies = [_reply(*r) for r in UNEQUAL]
    uniform = weighted_mean(replies, "uniform")
    np.testing.assert_allclose(uniform["a"], np.full((2, 3), (1.0 + 4.0 + 7.0) / 3))
    np.testing.assert_allclose(uniform["b"], np.full(4, -(1.0 + 4.0 + 7.0) / 3))
    by_examples = weighted_mean(replies, "examples")
    np.testing.assert_allclose(by_examples["a"], (1 * 1 + 4 * 3 + 7 * 8) / 12)
    assert not np.allclose(uniform["a"], by_examples["a"])
    assert all(np.array_equal(weighted_mean(replies)[k], by_examples[k]) for k in by_examples)
    assert build_config({}).federation.weighting == "examples"
    assert [upload_weight(n, "uniform") for _, _, n in UNEQUAL] == [1, 1, 1]
    assert [upload_weight(n, "examples") for _, _, n in UNEQUAL] == [1, 3, 8]
    with pytest.raises(ValueError, match="zero"):
        weighted_mean([_reply(0, 1.0, 0)], "uniform")  # no examples: no weight under either


def test_the_robust_paths_mean_follows_the_weighting_and_median_ignores_it() -> None:
    replies = [_reply(*r) for r in UNEQUAL]
    for weighting in ("examples", "uniform"):
        got = AGGREGATORS["mean"](replies, 0.2, weighting)
        assert all(np.array_equal(got[k], weighted_mean(replies, weighting)[k]) for k in got)
    assert AGGREGATORS["median"](replies, 0.2, "uniform")["a"][0, 0] == 4.0
    assert AGGREGATORS["median"](replies, 0.2, "examples")["a"][0, 0] == 4.0


@pytest.mark.parametrize("algorithm", ["fedavg", "fedcollm", "crosslm"])
@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_every_algorithm_aggregating_on_the_server_honours_the_weighting(
    algorithm: str, weighting: str
) -> None:
    """FedAvg and FedCoLLM average adapters, CrossLM score vectors, all through `aggregate_fit`."""
    config = build_config({"algorithm": algorithm, "federation": {"weighting": weighting, "num_clients": 3}})
    replies = [_reply(*r) for r in UNEQUAL]
    got = ALGORITHMS[algorithm](config).aggregate_fit(None, replies, 1)  # type: ignore[arg-type]
    assert float(got["a"][0, 0]) == pytest.approx(4.0 if weighting == "uniform" else 69 / 12, rel=1e-6)
