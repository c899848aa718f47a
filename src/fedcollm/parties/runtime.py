"""What each party holds during a run, and the messages that travel between them.

The algorithms read and write these objects; engines create them and move `Payload` and
`ClientReply` messages. Nothing here knows whether a message crosses a function call, a Ray
actor boundary or a network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcollm.config import ExperimentConfig
from fedcollm.data import (
    MCQuestion,
    MCRequest,
    Partition,
    load_questions,
    partition,
    render,
    sample_indices,
)
from fedcollm.evaluation.multiple_choice import EncodedRequests, encode_requests
from fedcollm.lm.encoding import Encoded, encode_pair
from fedcollm.lm.models import Arrays, LoadedModel, get_adapter, load_with_lora

Scalar = int | float | str | bool


def derive_seed(seed: int, *parts: int) -> int:
    """A 31-bit seed for one (round, client, purpose), identical on every engine."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclass
class Payload:
    """Server -> client message: named arrays and scalar settings."""

    arrays: Arrays
    config: dict[str, Scalar] = field(default_factory=dict)


@dataclass
class ClientReply:
    """Client -> server message: named arrays, the example count that weighs them, metrics."""

    client: int
    arrays: Arrays
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    """One line of `metrics.jsonl`."""

    round: int
    role: str
    client: int | None
    metric: str
    value: float
    note: str | None = None
    """Free text where a number is not enough (e.g. why an upload was rejected)."""

    def as_dict(self) -> dict[str, Any]:
        line: dict[str, Any] = {
            "round": self.round,
            "role": self.role,
            "client": self.client,
            "metric": self.metric,
            "value": self.value,
        }
        if self.note is not None:
            line["note"] = self.note
        return line


class Reporter:
    """Progress sink; the CLI's rich display implements it, tests use this silent default."""

    def phase(self, description: str, total: int | None = None) -> None:
        """A new unit of work begins (e.g. 'round 2 · client 3 training')."""

    def advance(self, completed: int, total: int | None = None, info: str = "") -> None:
        """Progress inside the current unit of work."""

    def message(self, text: str) -> None:
        """A line worth keeping in the log."""

    def step_callback(self) -> Callable[[int, int, float], None]:
        return lambda step, total, loss: self.advance(step, total, f"loss {loss:.3f}")


def torch_dtype(name: str) -> torch.dtype:
    """The compute dtype a config's `dtype` names; "auto" is resolved for this machine."""
    if name == "auto":
        return torch.bfloat16 if native_bfloat16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def dtype_text(setting: str) -> str:
    """The compute dtype as run summaries state it, e.g. "bfloat16 (auto)"."""
    if setting != "auto":
        return setting
    return f"{str(torch_dtype(setting)).removeprefix('torch.')} (auto)"


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX-512 BF16 or AMX).

    Only then is bfloat16 faster than float32 (x1.6 per training step, x2 per evaluation on the
    AVX-512 BF16 machine of bench/README.md); elsewhere torch emulates it, more slowly.
    """
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


@dataclass(frozen=True)
class ExperimentData:
    """The questions of one experiment and their seeded split, computable by every party."""

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
        assert config.eval.split is not None
        pool = load_questions(task.name, config.eval.split, task.source)
        chosen = sample_indices(len(pool), config.eval.limit or None, config.seed)
        return cls(tuple(train), split, tuple(pool[i] for i in chosen))

    def requests(self, config: ExperimentConfig, indices: tuple[int, ...] | None = None) -> list[MCRequest]:
        questions = self.train if indices is None else [self.train[i] for i in indices]
        return [render(config.task.name, q, config.task.format) for q in questions]

    def client_requests(self, config: ExperimentConfig, client: int) -> list[MCRequest]:
        return self.requests(config, self.split.clients[client])

    def aux_requests(self, config: ExperimentConfig) -> list[MCRequest]:
        return self.requests(config, self.split.aux)

    def eval_requests(self, config: ExperimentConfig) -> list[MCRequest]:
        return [render(config.task.name, q, config.task.format) for q in self.eval_questions]


def encode_sft(lm: LoadedModel, requests: list[MCRequest], max_length: int) -> list[Encoded]:
    """Training sequences: each question's context followed by its gold continuation."""
    return [
        encode_pair(
            lm.tokenizer,
            r.context,
            r.continuations[r.gold],
            add_bos=lm.add_bos,
            max_length=max_length,
        )
        for r in requests
    ]


def pad_id(lm: LoadedModel) -> int:
    return int(lm.tokenizer.pad_token_id) if lm.tokenizer.pad_token_id is not None else 0


@dataclass
class ClientRuntime:
    """One client: its id, its private training sequences and an SLM whose adapter it trains."""

    client_id: int
    slm: LoadedModel
    train: list[Encoded]
    requests: list[MCRequest]
    eval_requests: list[MCRequest] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(
        cls, config: ExperimentConfig, data: ExperimentData, client_id: int, slm: LoadedModel
    ) -> ClientRuntime:
        requests = data.client_requests(config, client_id)
        return cls(
            client_id,
            slm,
            encode_sft(slm, requests, config.train.max_length),
            requests,
            eval_requests=data.eval_requests(config),
        )

    def encoded_eval(self, config: ExperimentConfig) -> EncodedRequests:
        """The public evaluation set in this client's tokenisation, encoded once."""
        if "encoded_eval" not in self.state:
            self.state["encoded_eval"] = encode_requests(
                self.slm.tokenizer,
                self.eval_requests,
                add_bos=self.slm.add_bos,
                max_length=config.train.max_length,
            )
        return self.state["encoded_eval"]


@dataclass
class ServerRuntime:
    """The server: the LLM, the global SLM adapter, the auxiliary set and the evaluation set."""

    config: ExperimentConfig
    data: ExperimentData
    slm: LoadedModel
    llm: LoadedModel | None
    global_adapter: Arrays
    eval_requests: list[MCRequest]
    aux_requests: list[MCRequest]
    _eval_cache: dict[str, EncodedRequests] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    """The run folder, for algorithms that write files of their own (None: write nothing)."""

    @classmethod
    def create(
        cls,
        config: ExperimentConfig,
        data: ExperimentData,
        slm: LoadedModel,
        llm: LoadedModel | None,
        run_dir: Path | None = None,
    ) -> ServerRuntime:
        return cls(
            config=config,
            data=data,
            slm=slm,
            llm=llm,
            global_adapter=get_adapter(slm.model),
            eval_requests=data.eval_requests(config),
            aux_requests=data.aux_requests(config),
            run_dir=run_dir,
        )

    def encoded_eval(self, role: str) -> EncodedRequests:
        """Evaluation sequences for the model in `role`, encoded once per run."""
        if role not in self._eval_cache:
            lm = self.model(role)
            self._eval_cache[role] = encode_requests(
                lm.tokenizer,
                self.eval_requests,
                add_bos=lm.add_bos,
                max_length=self.config.train.max_length,
            )
        return self._eval_cache[role]

    def model(self, role: str) -> LoadedModel:
        if role == "slm":
            return self.slm
        if self.llm is None:
            raise ValueError("this experiment has no LLM")
        return self.llm


def load_client_models(config: ExperimentConfig, slm: LoadedModel) -> list[LoadedModel]:
    """Each client's SLM; clients naming the same model share one loaded copy (only adapters differ)."""
    loaded = {slm.name: slm}
    dtype = torch_dtype(config.dtype)
    out = []
    for k in range(config.federation.num_clients):
        name = config.federation.client_model(k, config.slm.name)
        if name not in loaded:
            loaded[name] = load_with_lora(name, config.slm.lora, derive_seed(config.seed, 1), dtype)
        out.append(loaded[name])
    return out


def load_models(config: ExperimentConfig, with_llm: bool) -> tuple[LoadedModel, LoadedModel | None]:
    """Load the SLM (shared by all in-process clients) and, if needed, the server's LLM."""
    dtype = torch_dtype(config.dtype)
    slm = load_with_lora(config.slm.name, config.slm.lora, derive_seed(config.seed, 1), dtype)
    llm = None
    if with_llm:
        if config.llm is None:
            raise ValueError(f"algorithm {config.algorithm!r} needs an [llm] section")
        llm = load_with_lora(config.llm.name, config.llm.lora, derive_seed(config.seed, 2), dtype)
    return slm, llm
