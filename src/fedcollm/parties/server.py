"""The server: the LLM, the global SLM adapter, the auxiliary set and the evaluation set."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcollm.config import ExperimentConfig
from fedcollm.data.generative import EvalItem, TrainItem
from fedcollm.evaluation.multiple_choice import (
    EncodedRequests,
    encode_requests,
    multiple_choice,
    scoring_length,
)
from fedcollm.evaluation.records import GenerationSet, QuestionSet
from fedcollm.lm.lora import get_adapter
from fedcollm.lm.models import LoadedModel
from fedcollm.parties.data import ExperimentData
from fedcollm.parties.resources import SharedResources
from fedcollm.protocol import Arrays


@dataclass
class ServerRuntime:
    """What the server holds during a run; `state` is the algorithm's (see `Algorithm.server_state`)."""

    config: ExperimentConfig
    data: ExperimentData
    slm: LoadedModel
    llm: LoadedModel | None
    global_adapter: Arrays
    eval_requests: list[EvalItem]
    aux_requests: list[TrainItem]
    _eval_cache: dict[str, EncodedRequests] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    """The run folder, for algorithms that write files of their own (None: write nothing)."""
    resources: SharedResources = field(default_factory=SharedResources)
    """Tokenizers and token bridges shared with the other parties of this process."""
    evaluations: list[QuestionSet | GenerationSet] = field(default_factory=list)
    """Per-question records of the evaluations since the run last took them (`take_evaluations`)."""

    @classmethod
    def create(
        cls,
        config: ExperimentConfig,
        data: ExperimentData,
        slm: LoadedModel,
        llm: LoadedModel | None,
        run_dir: Path | None = None,
        resources: SharedResources | None = None,
    ) -> ServerRuntime:
        resources = resources if resources is not None else SharedResources()
        for lm in (slm, llm):
            if lm is not None:
                resources.know(lm)
        return cls(
            config=config,
            data=data,
            slm=slm,
            llm=llm,
            global_adapter=get_adapter(slm.model),
            eval_requests=data.eval_requests(config),
            aux_requests=data.aux_requests(config),
            run_dir=run_dir,
            resources=resources,
        )

    def encoded_eval(self, role: str) -> EncodedRequests:
        """Evaluation sequences for the model in `role`, encoded once per run."""
        if role not in self._eval_cache:
            lm = self.model(role)
            self._eval_cache[role] = encode_requests(
                lm.tokenizer,
                multiple_choice(self.eval_requests),
                add_bos=lm.add_bos,
                max_length=scoring_length(lm.model, lm.tokenizer),
            )
        return self._eval_cache[role]

    def take_evaluations(self) -> list[QuestionSet | GenerationSet]:
        """The per-question records gathered since the last call (the run writes them)."""
        taken, self.evaluations = self.evaluations, []
        return taken

    def model(self, role: str) -> LoadedModel:
        """The SLM (`role="slm"`) or the LLM (`"llm"`)."""
        if role == "slm":
            return self.slm
        if self.llm is None:
            raise ValueError("this experiment has no LLM")
        return self.llm
