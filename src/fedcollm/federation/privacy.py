"""Client-level differential privacy for adapter means (DP-FedAvg, McMahan et al., ICLR 2018).

Each round every client's update (its uploaded adapter minus the global adapter it received) is
clipped to L2 norm `clip_norm` over all adapter tensors together, the clipped updates are
averaged uniformly over the K clients of the round, and Gaussian noise of standard deviation
`noise_multiplier · clip_norm / K` is added to the mean: one client changes the mean by at most
`clip_norm / K`, so each round is a Gaussian mechanism of noise multiplier σ on the clients'
data. Clipping and the noise scale are Flower's building blocks
(`flwr.supercore.differential_privacy`: `clip_inputs_inplace`, `compute_stdv`, the functions its
`DifferentialPrivacyServerSideFixedClipping` strategy uses); the noise is drawn from a seeded
generator so that a run is reproducible, where Flower's helper draws from numpy's global state.

The privacy spent is Opacus's RDP accountant (`opacus.accountants.RDPAccountant`) over the rounds
run so far, every client taking part in every round (sample rate 1); a target ε is met by
Opacus's `get_noise_multiplier` for the run's number of rounds.

Placements:

- `central`: the server clips every upload and adds the noise to the mean (it sees the
  un-noised uploads).
- `distributed`: each client clips its own update and adds its share of the noise,
  N(0, σ²·C²/K), before it uploads; the uniform mean of K such uploads carries noise of the same
  standard deviation σ·C/K, and under SecAgg+ the server never holds an un-noised sum. With K' < K
  uploads in a round (dropouts) the mean carries less noise: the round's effective noise
  multiplier is σ·√(K'/K), and that is what the accountant is given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fedcollm.config import PrivacyConfig
from fedcollm.errors import FedcollmError
from fedcollm.protocol import Arrays, ClientReply


class PrivacyError(FedcollmError, ValueError):
    """Privacy settings that cannot give the guarantee asked for."""


def epsilon_spent(noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε after `rounds` full-participation rounds of the Gaussian mechanism (Opacus RDP)."""
    return epsilon_of([noise_multiplier] * rounds, delta)


def epsilon_of(multipliers: Sequence[float], delta: float) -> float:
    """ε after one full-participation round per entry, each of its own noise multiplier."""
    if not multipliers:
        return 0.0
    if min(multipliers) <= 0:
        return float("inf")
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for multiplier in multipliers:
        accountant.step(noise_multiplier=multiplier, sample_rate=1.0)
    return float(accountant.get_epsilon(delta))


def effective_multiplier(noise_multiplier: float, planned: int, received: int) -> float:
    """A distributed round's noise multiplier when `received` of `planned` noised uploads arrive."""
    return noise_multiplier * math.sqrt(received / planned)


@lru_cache(maxsize=16)  # asked by the server and every client in every round: same answer each time
def noise_multiplier_for(target_epsilon: float, delta: float, rounds: int) -> float:
    """The smallest σ (Opacus's search, to its precision) that keeps ε ≤ `target_epsilon`."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=1.0,
                steps=rounds,
                accountant="rdp",
            )
        )
    except ValueError as exc:
        raise PrivacyError(
            f"privacy.target_epsilon = {target_epsilon:g} at δ = {delta:g} over {rounds} rounds: {exc}"
        ) from None


def _difference(upload: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """`upload − reference` per array, in float64 and sorted name order."""
    names = sorted(reference)
    if sorted(upload) != names:
        raise PrivacyError("an upload's arrays do not match the global adapter's")
    return [np.asarray(upload[n], np.float64) - np.asarray(reference[n], np.float64) for n in names]


@dataclass(frozen=True)
class ClippedMean:
    """The noised mean of clipped updates, and what the round spent."""

    arrays: Arrays
    noise_std: float
    clipped: int  # uploads whose update was scaled down to the bound
    update_norms: tuple[float, ...]


@dataclass(frozen=True)
class GaussianMechanism:
    """Clip each client's update to `clip_norm`, average, add N(0, (σ·C/K)²) per coordinate."""

    clip_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise PrivacyError(f"privacy.clip_norm must be > 0, got {self.clip_norm}")
        if self.noise_multiplier < 0:
            raise PrivacyError(f"privacy noise multiplier must be >= 0, got {self.noise_multiplier}")

    def noise_std(self, num_clients: int) -> float:
        """The noise standard deviation on the mean of `num_clients` clipped updates."""
        from flwr.supercore.differential_privacy import compute_stdv  # flwr: only where DP runs

        return compute_stdv(self.noise_multiplier, self.clip_norm, num_clients)

    def clipped_update(self, upload: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> Arrays:
        """`upload − reference`, scaled to norm ≤ `clip_norm` (float64, so the bound holds exactly)."""
        return dict(zip(sorted(reference), self._clipped(upload, reference)[0], strict=True))

    def _clipped(
        self, upload: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
    ) -> tuple[list[np.ndarray], float]:
        """The clipped update in sorted name order, and the update's norm before clipping."""
        from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

        update = _difference(upload, reference)
        norm = get_norm(update)
        if norm > self.clip_norm:  # Flower's clip divides by the norm, 0 for no update
            clip_inputs_inplace(update, self.clip_norm)
        return update, norm

    def noised_upload(
        self,
        upload: Mapping[str, np.ndarray],
        reference: Mapping[str, np.ndarray],
        num_clients: int,
        rng: np.random.Generator,
    ) -> Arrays:
        """A client's share (distributed placement): `reference` + its clipped update + N(0, σ²C²/K)."""
        update = self.clipped_update(upload, reference)
        std = self.noise_multiplier * self.clip_norm / math.sqrt(num_clients)
        noised: Arrays = {}
        for name, delta in update.items():
            noise = rng.normal(0.0, std, size=delta.shape) if std > 0 else 0.0
            noised[name] = (np.asarray(reference[name], np.float64) + delta + noise).astype(np.float32)
        return noised

    def aggregate(
        self,
        replies: Sequence[ClientReply],
        reference: Mapping[str, np.ndarray],
        rng: np.random.Generator,
    ) -> ClippedMean:
        """The next global adapter: `reference` + the noised uniform mean of the clipped updates."""
        if not replies:
            raise PrivacyError("no uploads to aggregate")
        clipped_updates = [self._clipped(reply.arrays, reference) for reply in replies]
        raw_norms = tuple(norm for _, norm in clipped_updates)
        std = self.noise_std(len(replies))
        arrays: Arrays = {}
        for position, name in enumerate(sorted(reference)):
            mean = np.mean([update[position] for update, _ in clipped_updates], axis=0)
            noise = rng.normal(0.0, std, size=mean.shape) if std > 0 else 0.0
            arrays[name] = (np.asarray(reference[name], np.float64) + mean + noise).astype(np.float32)
        clipped = sum(norm > self.clip_norm for norm in raw_norms)
        return ClippedMean(arrays, std, clipped, raw_norms)


def mechanism(privacy: PrivacyConfig, rounds: int) -> GaussianMechanism:
    """The mechanism of a `[privacy]` section: its σ, or the σ that spends `target_epsilon` in
    `rounds` (the run's `federation.rounds`, on the server and on every client alike)."""
    sigma = privacy.noise_multiplier
    if sigma is None:
        if privacy.target_epsilon is None:
            raise PrivacyError("set privacy.noise_multiplier or privacy.target_epsilon")
        sigma = noise_multiplier_for(privacy.target_epsilon, privacy.delta, rounds)
    return GaussianMechanism(privacy.clip_norm, sigma)
