"""Central client-level differential privacy: every client's update clipped, noise of the
accountant's scale on the mean, ε as Opacus's RDP accountant computes it, refused where it
cannot hold, and recorded per round by a run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedcollm.algorithms import ALGORITHMS, check_config
from fedcollm.config import ConfigError, PrivacyConfig, build_config
from fedcollm.engines import run_experiment
from fedcollm.federation.privacy import (
    GaussianMechanism,
    PrivacyError,
    effective_multiplier,
    epsilon_of,
    epsilon_spent,
    mechanism,
    noise_multiplier_for,
)
from fedcollm.protocol import ClientReply
from tests.helpers import read_metrics, saved_adapter, tiny_config

REFERENCE = {"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float32)}


def _reply(client: int, scale: float, rng: np.random.Generator) -> ClientReply:
    arrays = {
        name: (scale * rng.standard_normal(v.shape)).astype(np.float32) for name, v in REFERENCE.items()
    }
    return ClientReply(client, arrays, 10, {})


def _norm(arrays: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in arrays.values()))


def test_clipping_bounds_every_clients_update_and_keeps_small_ones() -> None:
    rng = np.random.default_rng(0)
    dp = GaussianMechanism(clip_norm=1.5, noise_multiplier=0.0)
    for scale in (0.01, 1.0, 100.0):
        reply = _reply(0, scale, rng)
        clipped = dp.clipped_update(reply.arrays, REFERENCE)
        raw = _norm(reply.arrays)
        assert _norm(clipped) <= 1.5 + 1e-9
        if raw <= 1.5:
            assert all(np.allclose(clipped[n], reply.arrays[n]) for n in REFERENCE)
        else:
            assert _norm(clipped) == pytest.approx(1.5)


def test_one_client_moves_the_noiseless_mean_by_at_most_clip_over_k() -> None:
    rng = np.random.default_rng(1)
    dp = GaussianMechanism(clip_norm=1.0, noise_multiplier=0.0)
    replies = [_reply(k, 5.0, rng) for k in range(4)]
    changed = [*replies[:3], _reply(3, 50.0, rng)]
    first = dp.aggregate(replies, REFERENCE, np.random.default_rng(0)).arrays
    second = dp.aggregate(changed, REFERENCE, np.random.default_rng(0)).arrays
    difference = {n: first[n].astype(np.float64) - second[n] for n in REFERENCE}
    assert _norm(difference) <= 2 * 1.0 / 4 + 1e-6  # the two clipped updates differ by at most 2C


def test_the_realised_noise_has_the_accountants_standard_deviation() -> None:
    reference = {"w": np.zeros(200_000, np.float32)}
    dp = GaussianMechanism(clip_norm=0.5, noise_multiplier=2.0)
    replies = [ClientReply(k, {"w": reference["w"].copy()}, 1, {}) for k in range(4)]  # zero updates
    result = dp.aggregate(replies, reference, np.random.default_rng(3))
    assert result.noise_std == pytest.approx(2.0 * 0.5 / 4)
    assert float(np.std(result.arrays["w"])) == pytest.approx(result.noise_std, rel=0.01)
    assert abs(float(np.mean(result.arrays["w"]))) < 5 * result.noise_std / math.sqrt(200_000)


def _rdp_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """The Gaussian mechanism's RDP, ε(α) = T·α / (2σ²), converted as Balle et al. (2020) do."""
    orders = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
    rdp = rounds * orders / (2 * sigma**2)
    eps = rdp + np.log1p(-1 / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    return float(np.nanmin(eps))


@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 10), (2.0, 3), (0.7, 1)])
def test_epsilon_is_the_rdp_of_full_participation_rounds(sigma: float, rounds: int) -> None:
    assert epsilon_spent(sigma, rounds, 1e-5) == pytest.approx(_rdp_epsilon(sigma, rounds, 1e-5), rel=1e-6)
    assert epsilon_spent(sigma, 0, 1e-5) == 0.0 and epsilon_spent(0.0, 3, 1e-5) == math.inf


def test_a_target_epsilon_is_met_by_the_noise_multiplier_found() -> None:
    sigma = noise_multiplier_for(8.0, 1e-5, 5)
    spent = epsilon_spent(sigma, 5, 1e-5)
    assert spent <= 8.0 and spent == pytest.approx(8.0, rel=0.02)
    privacy = PrivacyConfig(mode="central", clip_norm=1.0, target_epsilon=8.0, delta=1e-5)
    assert mechanism(privacy, 5).noise_multiplier == sigma
    with pytest.raises(PrivacyError, match="clip_norm must be > 0"):
        GaussianMechanism(0.0, 1.0)


def _dp_config(tiny_llama: Path, **privacy: object) -> dict[str, object]:
    data = tiny_config(tiny_llama, tiny_llama, algorithm="fedavg")
    data["federation"] = {"rounds": 2, "num_clients": 2, "weighting": "uniform"}
    data["privacy"] = {"mode": "central", "clip_norm": 0.05, **privacy}
    return data


def test_a_privacy_config_needs_exactly_one_noise_setting(tiny_llama: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"exactly one of privacy\.noise_multiplier and privacy\.target_epsilon"
    ):
        build_config(_dp_config(tiny_llama))
    with pytest.raises(ConfigError, match="exactly one"):
        build_config(_dp_config(tiny_llama, noise_multiplier=1.0, target_epsilon=8.0))


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_dp_is_refused_where_the_aggregate_is_no_adapter_mean(tiny_llama: Path, algorithm: str) -> None:
    data = _dp_config(tiny_llama, noise_multiplier=1.0)
    data["algorithm"] = algorithm
    problems = ALGORITHMS[algorithm].privacy_problems(build_config(data))
    if ALGORITHMS[algorithm].uses_clients and ALGORITHMS[algorithm].aggregates_adapters:
        assert problems == []
    else:
        assert any("aggregates no adapter mean" in p for p in problems)


def test_dp_needs_a_uniform_mean_and_no_secure_aggregation(tiny_llama: Path) -> None:
    data = _dp_config(tiny_llama, noise_multiplier=1.0)
    data["federation"] = {"rounds": 2, "num_clients": 2, "weighting": "examples"}
    with pytest.raises(ConfigError, match=r'federation\.weighting = "uniform"'):
        check_config(build_config(data))
    config = build_config(_dp_config(tiny_llama, noise_multiplier=1.0))
    assert any("SecAgg+" in p for p in ALGORITHMS["fedavg"].secure_aggregation_problems(config))


def test_a_dp_run_records_epsilon_per_round_and_is_reproducible(tiny_llama: Path, tmp_path: Path) -> None:
    config = build_config(_dp_config(tiny_llama, noise_multiplier=1.1))
    run_experiment(config, tmp_path / "a")
    run_experiment(config, tmp_path / "b")
    spent = {m["round"]: m["value"] for m in read_metrics(tmp_path / "a") if m["metric"] == "dp_epsilon"}
    assert spent == {
        1: pytest.approx(epsilon_spent(1.1, 1, 1e-5)),
        2: pytest.approx(epsilon_spent(1.1, 2, 1e-5)),
    }
    assert f"ε = {spent[2]:.3g} after round 2" in (tmp_path / "a" / "results.md").read_text()
    first, second = saved_adapter(tmp_path / "a"), saved_adapter(tmp_path / "b")
    assert all(np.array_equal(first[n], second[n]) for n in first)
    other_seed = build_config(_dp_config(tiny_llama, noise_multiplier=1.1) | {"seed": 1})
    run_experiment(other_seed, tmp_path / "c")  # another seed draws other noise
    assert any(not np.array_equal(first[n], saved_adapter(tmp_path / "c")[n]) for n in first)


def test_distributed_shares_add_up_to_the_central_noise() -> None:
    reference = {"w": np.zeros(200_000, np.float32)}
    dp = GaussianMechanism(clip_norm=0.5, noise_multiplier=2.0)
    shares = [dp.noised_upload(reference, reference, 4, np.random.default_rng(k)) for k in range(4)]
    assert float(np.std(shares[0]["w"])) == pytest.approx(2.0 * 0.5 / 2, rel=0.01)  # σC/√K each
    mean = np.mean([s["w"] for s in shares], axis=0)
    assert float(np.std(mean)) == pytest.approx(dp.noise_std(4), rel=0.01)  # σC/K, as central
    big = {"w": np.full(200_000, 1.0, np.float32)}
    noiseless = GaussianMechanism(clip_norm=0.5, noise_multiplier=0.0)
    assert _norm(noiseless.noised_upload(big, reference, 4, np.random.default_rng(0))) == pytest.approx(0.5)


def test_dropouts_lower_a_distributed_rounds_noise_multiplier() -> None:
    assert effective_multiplier(2.0, 4, 4) == 2.0
    assert effective_multiplier(2.0, 4, 1) == pytest.approx(1.0)
    assert (
        epsilon_of([2.0, 1.0], 1e-5)
        > epsilon_of([2.0, 2.0], 1e-5)
        == pytest.approx(epsilon_spent(2.0, 2, 1e-5))
    )


def test_a_distributed_dp_run_noises_on_the_clients_and_records_epsilon(
    tiny_llama: Path, tmp_path: Path
) -> None:
    config = build_config(_dp_config(tiny_llama, noise_multiplier=1.1) | {"privacy": _distributed()})
    run_experiment(config, tmp_path / "a")
    spent = {m["round"]: m["value"] for m in read_metrics(tmp_path / "a") if m["metric"] == "dp_epsilon"}
    assert spent == {
        1: pytest.approx(epsilon_spent(1.1, 1, 1e-5)),
        2: pytest.approx(epsilon_spent(1.1, 2, 1e-5)),
    }
    assert "distributed DP" in (tmp_path / "a" / "results.md").read_text()
    assert ALGORITHMS["fedavg"].secure_aggregation_problems(config) == []


def _distributed() -> dict[str, object]:
    return {"mode": "distributed", "clip_norm": 0.05, "noise_multiplier": 1.1}


@pytest.mark.slow
def test_distributed_dp_under_secagg_gives_the_embedded_engines_adapter(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """The clients' noise is seeded per round and client, so SecAgg+ on Flower's simulation
    aggregates the same noised shares as the embedded engine, up to its quantisation."""
    from fedcollm.engines.flower.options import FlowerOptions

    data = _dp_config(tiny_llama) | {"privacy": _distributed()}
    data["federation"] = {"rounds": 1, "num_clients": 3, "weighting": "uniform"}
    config = build_config(data)
    run_experiment(config, tmp_path / "embedded")
    run_experiment(config, tmp_path / "secagg", engine="flower", flower=FlowerOptions(secagg=True))
    embedded, secure = saved_adapter(tmp_path / "embedded"), saved_adapter(tmp_path / "secagg")
    for name, value in embedded.items():
        np.testing.assert_allclose(secure[name], value, atol=1e-4)
    assert any(m["metric"] == "dp_epsilon" for m in read_metrics(tmp_path / "secagg"))
