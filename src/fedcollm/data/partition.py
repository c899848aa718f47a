"""Seeded splits of a question list into the server's auxiliary set and client shards.

FedCoLLM-style setups keep a small public auxiliary set on the server (for distillation)
and spread the rest over clients, either IID or label-skewed (Dirichlet over the gold
answer index). Client shards are built with flwr-datasets' partitioners so they match what
Flower users get.
"""

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fedcollm.data.errors import DataError

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

_INDEX = "index"
_LABEL = "label"


@dataclass(frozen=True)
class Partition:
    """Disjoint index sets covering a question list; every tuple is sorted ascending."""

    aux: tuple[int, ...]  # indices (into the question list) of the server's auxiliary set
    clients: tuple[tuple[int, ...], ...]  # one index tuple per client


class ClientScheme(Protocol):
    """Builds the flwr-datasets partitioner that spreads the non-aux items over clients."""

    def partitioner(self, num_clients: int, alpha: float, seed: int, min_client_size: int) -> "Partitioner":
        """A fresh partitioner for ``num_clients`` clients."""
        ...


@dataclass(frozen=True)
class IidScheme:
    """Equal-size random shards (sizes differ by at most one).

    ``IidPartitioner`` cuts contiguous shards; the rows it receives are already in seeded
    random order, so the shards are IID samples.
    """

    def partitioner(self, num_clients: int, alpha: float, seed: int, min_client_size: int) -> "Partitioner":
        """An ``IidPartitioner`` (alpha, seed and min size do not apply)."""
        from flwr_datasets.partitioner import IidPartitioner

        return IidPartitioner(num_partitions=num_clients)


@dataclass(frozen=True)
class DirichletScheme:
    """Label-skewed shards: per label, client shares ~ Dirichlet(alpha); small alpha, more skew."""

    def partitioner(self, num_clients: int, alpha: float, seed: int, min_client_size: int) -> "Partitioner":
        """A seeded ``DirichletPartitioner`` over the gold-label column."""
        from flwr_datasets.partitioner import DirichletPartitioner

        if not alpha > 0:
            raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by=_LABEL,
            alpha=float(alpha),
            min_partition_size=min_client_size,
            seed=seed,
        )


SCHEMES: dict[str, ClientScheme] = {"iid": IidScheme(), "dirichlet": DirichletScheme()}


def partition(
    labels: Sequence[int],
    num_clients: int,
    aux_fraction: float,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    *,
    min_client_size: int = 1,
) -> Partition:
    """Split ``len(labels)`` items into an aux set and ``num_clients`` client shards.

    A permutation seeded by ``seed`` first takes ``round(aux_fraction * N)`` items for aux;
    the rest go to clients by ``scheme`` (a key of ``SCHEMES``). ``labels[i]`` is item i's
    label (the gold choice index), used by the Dirichlet scheme. ``min_client_size`` is the
    smallest shard the Dirichlet scheme accepts. Same arguments, same partition.
    """
    if scheme not in SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}; available schemes: {', '.join(SCHEMES)}")
    if not 0 <= aux_fraction < 1:
        raise DataError(f"aux_fraction must be in [0, 1), got {aux_fraction}")
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    total = len(labels)
    order = np.random.default_rng(seed).permutation(total)
    num_aux = round(aux_fraction * total)
    aux, rest = order[:num_aux], order[num_aux:]
    if num_clients > len(rest):
        raise DataError(
            f"cannot give {num_clients} clients at least one example each: {total} examples, "
            f"{num_aux} reserved for aux, {len(rest)} left for clients; use fewer clients "
            "or a smaller aux_fraction"
        )
    shards = _client_shards(rest, labels, num_clients, scheme, alpha, seed, min_client_size)
    return Partition(aux=tuple(sorted(aux.tolist())), clients=shards)


def _client_shards(
    rest: np.ndarray,
    labels: Sequence[int],
    num_clients: int,
    scheme: str,
    alpha: float,
    seed: int,
    min_client_size: int,
) -> tuple[tuple[int, ...], ...]:
    """Run the scheme's flwr-datasets partitioner over the non-aux items."""
    import datasets

    rest_list = rest.tolist()
    table = datasets.Dataset.from_dict({_INDEX: rest_list, _LABEL: [int(labels[i]) for i in rest_list]})
    partitioner = SCHEMES[scheme].partitioner(num_clients, alpha, seed, min_client_size)
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():  # flwr warns on every Dirichlet resampling attempt
            warnings.simplefilter("ignore", UserWarning)
            return tuple(
                tuple(sorted(partitioner.load_partition(client)[_INDEX])) for client in range(num_clients)
            )
    except ValueError as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(
            f"{scheme} partitioning of {len(rest_list)} examples over {num_clients} clients "
            f"failed to give every client >= {min_client_size} examples (alpha={alpha}): "
            f"{exc}; try a larger alpha or fewer clients"
        ) from exc


def sample_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """A seeded random subset of ``range(n)`` of size ``limit``, sorted (all if None or >= n).

    For evaluating on a fixed, reproducible subsample that keeps the source order.
    """
    if n < 0:
        raise DataError(f"n must be >= 0, got {n}")
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 0:
        raise DataError(f"limit must be None or >= 0, got {limit}")
    chosen = np.random.default_rng(seed).choice(n, size=limit, replace=False)
    return sorted(chosen.tolist())
