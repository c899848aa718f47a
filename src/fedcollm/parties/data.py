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
    and the evaluation questions. Every party rebuilds the same object from the config."""

    train: tuple[MCQuestion, ...]
    split: Partition
    eval_questions: tuple[MCQuestion, ...]

    @classmethod
    def load(cls, config: ExperimentConfig) -> ExperimentData:
        task = config.task
        train = load_questions(task.name, task.train_split, task.source, limit=task.train_limit)
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

    def client_requests(self, config: ExperimentConfig, client: int) -> list[MCRequest]:
        """Client `client`'s private shard."""
        return self.requests(config, self.split.clients[client])

    def aux_requests(self, config: ExperimentConfig) -> list[MCRequest]:
        """The server's auxiliary set D_a (FedMKT's public set D_p)."""
        return self.requests(config, self.split.aux)

    def eval_requests(self, config: ExperimentConfig) -> list[MCRequest]:
        """The evaluation questions rendered in the task's prompt format."""
        return [render(config.task.name, q, config.task.format) for q in self.eval_questions]
