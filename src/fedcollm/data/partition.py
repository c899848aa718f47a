"""Seeded splits of a question list into the server's auxiliary set and client shards.

FedCoLLM-style setups keep a small public auxiliary set on the server (for distillation)
and spread the rest over clients: IID, label-skewed (Dirichlet over the gold answer index), or
by a field of the records (each client holds whole domains: ARC's exam source, a topic column
of the user's file), the natural non-IID split. Client shards are built with flwr-datasets'
partitioners so they match what Flower users get.
"""

import contextlib
import io
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
_CLIENT = "client"  # the field scheme's column: the client each value group goes to


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


@dataclass(frozen=True)
class FieldScheme:
    """Whole value groups of one record field per client (`assign_values` decides which).

    ``NaturalIdPartitioner`` gives one partition per distinct value of the ``client`` column,
    in sorted order, so partition k is client k's groups.
    """

    def partitioner(self, num_clients: int, alpha: float, seed: int, min_client_size: int) -> "Partitioner":
        """A ``NaturalIdPartitioner`` over the client each item's value was assigned to."""
        from flwr_datasets.partitioner import NaturalIdPartitioner

        return NaturalIdPartitioner(partition_by=_CLIENT)


SCHEMES: dict[str, ClientScheme] = {
    "iid": IidScheme(),
    "dirichlet": DirichletScheme(),
    "field": FieldScheme(),
}


def assign_values(values: Sequence[str], num_clients: int, groups: Sequence[Sequence[str]] = ()) -> list[int]:
    """The client of each item under a split by field value (-1: the item goes to no client).

    With ``groups`` (one list of values per client) client k holds the items whose value is in
    ``groups[k]`` and items of other values are left out. Without, every value goes to one
    client: values by descending count (ties by name), each to the client holding the fewest
    items so far (ties to the lowest index), which keeps domains whole and sizes as even as
    they allow. Deterministic: the seed moves which items reach the clients, not this mapping.
    """
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    if groups:
        client_of = _explicit_groups(groups, num_clients, counts)
    else:
        if len(counts) < num_clients:
            raise DataError(
                f"task.partition_field has {len(counts)} distinct value(s) among the clients' "
                f"{len(values)} examples ({', '.join(sorted(counts)) or 'none'}), fewer than the "
                f"{num_clients} clients: every client needs a value of its own; use fewer clients"
            )
        loads = [0] * num_clients
        client_of = {}
        for value in sorted(counts, key=lambda v: (-counts[v], v)):
            client = min(range(num_clients), key=lambda k: (loads[k], k))
            client_of[value] = client
            loads[client] += counts[value]
    return [client_of.get(value, -1) for value in values]


def _explicit_groups(
    groups: Sequence[Sequence[str]], num_clients: int, counts: dict[str, int]
) -> dict[str, int]:
    """``task.partition_groups`` as a value -> client map, checked against the data."""
    if len(groups) != num_clients:
        raise DataError(
            f"task.partition_groups lists {len(groups)} group(s) for {num_clients} clients; give one "
            "list of values per client"
        )
    client_of: dict[str, int] = {}
    for client, group in enumerate(groups):
        for value in group:
            if value in client_of:
                raise DataError(
                    f"task.partition_groups: value {value!r} is given to clients "
                    f"{client_of[value]} and {client}"
                )
            client_of[value] = client
        if not any(counts.get(value, 0) for value in group):
            present = ", ".join(f"{v} ({n})" for v, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            raise DataError(
                f"task.partition_groups[{client}] = {list(group)} matches none of the clients' "
                f"examples; the field's values there: {present}"
            )
    return client_of


def partition(
    labels: Sequence[int],
    num_clients: int,
    aux_fraction: float,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    *,
    min_client_size: int = 1,
    values: Sequence[str] | None = None,
    groups: Sequence[Sequence[str]] = (),
) -> Partition:
    """Split ``len(labels)`` items into an aux set and ``num_clients`` client shards.

    A permutation seeded by ``seed`` first takes ``round(aux_fraction * N)`` items for aux;
    the rest go to clients by ``scheme`` (a key of ``SCHEMES``). ``labels[i]`` is item i's
    label (the gold choice index), used by the Dirichlet scheme. ``min_client_size`` is the
    smallest shard the Dirichlet scheme accepts. The field scheme needs ``values[i]``, item i's
    value of the partition field, and takes ``groups`` (`assign_values`); items it gives to no
    client are in neither the aux set nor any shard. Same arguments, same partition.
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
    clients = None
    if scheme == "field":
        if values is None or len(values) != total:
            raise DataError("the field partition needs one field value per example")
        clients = assign_values([values[i] for i in rest.tolist()], num_clients, groups)
    shards = _client_shards(rest, labels, num_clients, scheme, alpha, seed, min_client_size, clients)
    return Partition(aux=tuple(sorted(aux.tolist())), clients=shards)


def _client_shards(
    rest: np.ndarray,
    labels: Sequence[int],
    num_clients: int,
    scheme: str,
    alpha: float,
    seed: int,
    min_client_size: int,
    clients: Sequence[int] | None = None,
) -> tuple[tuple[int, ...], ...]:
    """Run the scheme's flwr-datasets partitioner over the non-aux items (those of `clients`
    -1, the field scheme's left-out items, dropped first)."""
    import datasets

    rest_list = rest.tolist()
    columns: dict[str, list[int]] = {_INDEX: rest_list, _LABEL: [int(labels[i]) for i in rest_list]}
    if clients is not None:
        kept = [k for k, client in enumerate(clients) if client >= 0]
        columns = {name: [column[k] for k in kept] for name, column in columns.items()}
        columns[_CLIENT] = [clients[k] for k in kept]
    table = datasets.Dataset.from_dict(columns)
    partitioner = SCHEMES[scheme].partitioner(num_clients, alpha, seed, min_client_size)
    partitioner.dataset = table
    try:
        # flwr warns on every Dirichlet resampling attempt, and NaturalIdPartitioner draws a
        # tqdm bar on stderr for a split that takes milliseconds.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
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
