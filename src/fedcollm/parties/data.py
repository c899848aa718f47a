"""The examples of one experiment and their seeded split, computable by every party.

What kind of examples they are (multiple-choice questions, short-answer questions, instruction
or chat conversations) is the task family's business (`fedcollm.data.families`): here they are
records, and the items models train and are evaluated on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedcollm.config import ExperimentConfig
from fedcollm.data import DataError, Partition, partition, sample_indices
from fedcollm.data.families import Record, TaskFamily, task_family
from fedcollm.data.generative import EvalItem, TrainItem


def field_values(family: TaskFamily, records: Sequence[Record], name: str) -> list[str]:
    """Each record's value of `task.partition_field` (multiple choice also: ``label``, its gold index)."""
    return family.field_values(records, name)


@dataclass(frozen=True)
class ExperimentData:
    """The training records, their split into the server's auxiliary set and client shards, and
    the evaluation records. Every party rebuilds the same object from the config.

    With `task.client_source = "files"` the clients' records are not in it: each client reads
    its own file where it runs (`client_records`), and `split.clients` is empty. With
    `task.aux_data` the server's auxiliary set is that file (`aux`), and every training record
    goes to the clients; with `task.eval_data` the evaluation set is that file.
    """

    family: TaskFamily
    train: tuple[Record, ...]
    split: Partition
    eval_records: tuple[Record, ...]
    aux: tuple[Record, ...] | None = None
    """The server's own auxiliary set (`task.aux_data`), or None: the split's `aux` share."""

    @classmethod
    def load(cls, config: ExperimentConfig) -> ExperimentData:
        task = config.task
        family = task_family(task.name)
        aux_file = _read_server_file(family, task.aux_data, "task.aux_data", task.required_fields)
        needs_train = task.client_source == "partition" or aux_file is None
        train = family.load(task.train_split, task.source, task.train_limit) if needs_train else []
        aux_fraction = 0.0 if aux_file is not None else task.aux_fraction
        if task.client_source == "files":
            # Only the server's D_a may come from the split; the clients bring their own files.
            aux = partition(family.labels(train), 1, aux_fraction, seed=config.seed).aux if train else ()
            split = Partition(aux, ())
        else:
            if task.partition == "dirichlet" and family.kind != "multiple_choice":
                raise DataError(
                    f'task.partition = "dirichlet" skews clients by the gold answer, which task '
                    f'{task.name!r} does not have (its answers are written); use "iid" or "field"'
                )
            split = partition(
                family.labels(train),
                config.federation.num_clients,
                aux_fraction,
                scheme=task.partition,
                alpha=task.dirichlet_alpha,
                seed=config.seed,
                values=family.field_values(train, task.partition_field)
                if task.partition == "field"
                else None,
                groups=task.partition_groups,
            )
        if task.eval_data:
            pool = _read_server_file(family, task.eval_data, "task.eval_data", ()) or []
        else:
            pool = list(family.load(config.eval_split, task.source, None))
        chosen = sample_indices(len(pool), config.eval.limit or None, config.eval_seed)
        server_aux = tuple(aux_file) if aux_file is not None else None
        return cls(family, tuple(train), split, tuple(pool[i] for i in chosen), server_aux)

    @property
    def kind(self) -> str:
        """ "multiple_choice" or "generation": how models answer this experiment's questions."""
        return self.family.kind

    def train_items(self, config: ExperimentConfig, records: Sequence[Record]) -> list[TrainItem]:
        return [self.family.train_item(r, config.task.format) for r in records]

    def requests(self, config: ExperimentConfig, indices: tuple[int, ...] | None = None) -> list[TrainItem]:
        """Training items of the records (all, or those at `indices`)."""
        records = self.train if indices is None else [self.train[i] for i in indices]
        return self.train_items(config, records)

    def client_records(
        self, config: ExperimentConfig, client: int, data_path: str | None = None
    ) -> list[Record]:
        """Client `client`'s private training records: its shard of the split, or (client_source
        "files") its own file, `data_path` (its SuperNode's node config) else `task.client_data`.

        Raises `DataError` naming the client and, for a file, the file, line and field at fault.
        """
        task = config.task
        if task.client_source == "partition":
            if data_path is not None:
                raise DataError(
                    f"client {client}: its SuperNode names data-path={data_path!r}, but the experiment "
                    "gives each client a share of the task's training split (task.client_source = "
                    '"partition"); set task.client_source = "files" to train on each site\'s own file'
                )
            return [self.train[i] for i in self.split.clients[client]]
        path = data_path or (task.client_data[client] if task.client_data else None)
        if path is None:
            raise DataError(
                f'client {client} has no data file (task.client_source = "files"): start its SuperNode '
                "with --node-config 'data-path=\"/path/to/file.jsonl\"' or list it in task.client_data"
            )
        try:
            return list(self.family.read_file(path, task.train_limit, task.required_fields))
        except DataError as exc:
            raise DataError(f"client {client}: {exc}") from None

    def client_eval_records(
        self, config: ExperimentConfig, client: int, eval_path: str | None = None
    ) -> list[Record]:
        """Client `client`'s own evaluation records (`task.client_eval`): `eval_path` (its
        SuperNode's node config) else `task.client_eval_data[k]`; none without client_eval.

        Raises `DataError` naming the client, the file, line and field at fault.
        """
        task = config.task
        if not task.client_eval:
            return []
        path = eval_path or (task.client_eval_data[client] if task.client_eval_data else None)
        if path is None:
            raise DataError(
                f"client {client} has no evaluation file (task.client_eval): start its SuperNode with "
                "--node-config 'eval-path=\"/path/to/eval.jsonl\"' or list it in task.client_eval_data"
            )
        try:
            records = list(self.family.read_file(path, None, ()))
        except DataError as exc:
            raise DataError(f"client {client}: evaluation file: {exc}") from None
        return records

    def client_eval_requests(
        self, config: ExperimentConfig, client: int, eval_path: str | None = None
    ) -> list[EvalItem]:
        """Client `client`'s own evaluation items (none without `task.client_eval`)."""
        return [
            self.family.eval_item(r, config.task.format)
            for r in self.client_eval_records(config, client, eval_path)
        ]

    def client_requests(
        self, config: ExperimentConfig, client: int, data_path: str | None = None
    ) -> list[TrainItem]:
        """Client `client`'s private training items."""
        return self.train_items(config, self.client_records(config, client, data_path))

    def union_requests(self, config: ExperimentConfig) -> list[TrainItem]:
        """Every client's items and the auxiliary set's, in one place (the Centralized
        baseline's data). With client files, each must be readable here (`task.client_data`)."""
        if config.task.client_source == "partition" and self.aux is None:
            return self.requests(config)
        if config.task.client_source == "files" and not config.task.client_data:
            raise DataError(
                "the union of every client's data needs their files in one place: list them in "
                'task.client_data (task.client_source = "files")'
            )
        clients = [r for k in range(config.federation.num_clients) for r in self.client_requests(config, k)]
        return self.aux_requests(config) + clients

    def aux_records(self) -> list[Record]:
        """The server's auxiliary set D_a (FedMKT's public set D_p)."""
        return list(self.aux) if self.aux is not None else [self.train[i] for i in self.split.aux]

    def aux_requests(self, config: ExperimentConfig) -> list[TrainItem]:
        return self.train_items(config, self.aux_records())

    def eval_requests(self, config: ExperimentConfig) -> list[EvalItem]:
        """The evaluation items."""
        return [self.family.eval_item(r, config.task.format) for r in self.eval_records]


def _read_server_file(
    family: TaskFamily, path: str | None, key: str, required_fields: Sequence[str]
) -> list[Record] | None:
    """The server's own set from `path` (None if not configured); errors name the key."""
    if not path:
        return None
    try:
        records = list(family.read_file(path, None, required_fields))
    except DataError as exc:
        raise DataError(f"{key}: {exc}") from None
    return records
