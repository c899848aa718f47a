"""The questions of one experiment and their seeded split, computable by every party."""

from __future__ import annotations

from dataclasses import dataclass

from fedcollm.config import ExperimentConfig
from fedcollm.data import MCQuestion, MCRequest, Partition, load_questions, partition, render, sample_indices


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
