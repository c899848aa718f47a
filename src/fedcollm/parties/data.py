"""The questions of one experiment and their seeded split, computable by every party."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedcollm.config import ExperimentConfig
from fedcollm.data import (
    DataError,
    MCQuestion,
    MCRequest,
    Partition,
    load_questions,
    partition,
    render,
    sample_indices,
)
from fedcollm.data.question_files import read_question_file


def field_values(questions: Sequence[MCQuestion], name: str) -> list[str]:
    """Each question's value of `task.partition_field` (``label``: its gold index)."""
    if name == "label":
        return [str(q.gold) for q in questions]
    values = [q.fields.get(name) for q in questions]
    missing = [q.id for q, value in zip(questions, values, strict=True) if value is None]
    if missing:
        known = sorted({key for q in questions for key in q.fields})
        raise DataError(
            f"task.partition_field = {name!r}: {len(missing)} of {len(questions)} training questions "
            f"lack it (first: {missing[0]!r}); their fields: {', '.join(known) or 'none'}, and 'label'"
        )
    return [value for value in values if value is not None]


@dataclass(frozen=True)
class ExperimentData:
    """The training questions, their split into the server's auxiliary set and client shards,
    and the evaluation questions. Every party rebuilds the same object from the config.

    With `task.client_source = "files"` the clients' questions are not in it: each client reads
    its own file where it runs (`client_questions`), and `split.clients` is empty.
    """

    train: tuple[MCQuestion, ...]
    split: Partition
    eval_questions: tuple[MCQuestion, ...]

    @classmethod
    def load(cls, config: ExperimentConfig) -> ExperimentData:
        task = config.task
        train = load_questions(task.name, task.train_split, task.source, limit=task.train_limit)
        if task.client_source == "files":
            # Only the server's D_a is drawn from the split; the clients bring their own files.
            aux = partition([q.gold for q in train], 1, task.aux_fraction, seed=config.seed).aux
            split = Partition(aux, ())
        else:
            split = partition(
                [q.gold for q in train],
                config.federation.num_clients,
                task.aux_fraction,
                scheme=task.partition,
                alpha=task.dirichlet_alpha,
                seed=config.seed,
                values=field_values(train, task.partition_field) if task.partition == "field" else None,
                groups=task.partition_groups,
            )
        pool = load_questions(task.name, config.eval_split, task.source)
        chosen = sample_indices(len(pool), config.eval.limit or None, config.eval_seed)
        return cls(tuple(train), split, tuple(pool[i] for i in chosen))

    def requests(self, config: ExperimentConfig, indices: tuple[int, ...] | None = None) -> list[MCRequest]:
        """Training questions (all, or those at `indices`) rendered in the task's prompt format."""
        questions = self.train if indices is None else [self.train[i] for i in indices]
        return [render(config.task.name, q, config.task.format) for q in questions]

    def client_questions(
        self, config: ExperimentConfig, client: int, data_path: str | None = None
    ) -> list[MCQuestion]:
        """Client `client`'s private training questions: its shard of the split, or (client_source
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
            return read_question_file(path, task.train_limit, task.required_fields)
        except DataError as exc:
            raise DataError(f"client {client}: {exc}") from None

    def client_requests(
        self, config: ExperimentConfig, client: int, data_path: str | None = None
    ) -> list[MCRequest]:
        """Client `client`'s private training questions in the task's prompt format."""
        return [
            render(config.task.name, q, config.task.format)
            for q in self.client_questions(config, client, data_path)
        ]

    def union_requests(self, config: ExperimentConfig) -> list[MCRequest]:
        """Every client's questions and the auxiliary set's, in one place (the Centralized
        baseline's data). With client files, each must be readable here (`task.client_data`)."""
        if config.task.client_source == "partition":
            return self.requests(config)
        if not config.task.client_data:
            raise DataError(
                "the union of every client's data needs their files in one place: list them in "
                'task.client_data (task.client_source = "files")'
            )
        clients = [r for k in range(config.federation.num_clients) for r in self.client_requests(config, k)]
        return self.aux_requests(config) + clients

    def aux_requests(self, config: ExperimentConfig) -> list[MCRequest]:
        """The server's auxiliary set D_a (FedMKT's public set D_p)."""
        return self.requests(config, self.split.aux)

    def eval_requests(self, config: ExperimentConfig) -> list[MCRequest]:
        """The evaluation questions rendered in the task's prompt format."""
        return [render(config.task.name, q, config.task.format) for q in self.eval_questions]
