"""One client: its id, its private training sequences, and the SLM whose adapter it trains."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedcollm.config import ExperimentConfig
from fedcollm.data.generative import EvalItem, TrainItem
from fedcollm.evaluation.multiple_choice import (
    EncodedRequests,
    encode_requests,
    multiple_choice,
    scoring_length,
)
from fedcollm.lm.encoding import Encoded
from fedcollm.lm.models import LoadedModel
from fedcollm.parties.data import ExperimentData
from fedcollm.parties.resources import SharedResources


@dataclass
class ClientRuntime:
    """What a client holds during a run; `state` is the algorithm's (see `Algorithm.client_state`)."""

    client_id: int
    slm: LoadedModel
    train: list[Encoded]
    requests: list[TrainItem]
    eval_requests: list[EvalItem] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    public_requests: list[TrainItem] = field(default_factory=list)
    local_eval: list[EvalItem] = field(default_factory=list)
    """The client's own evaluation set (`task.client_eval`): scored where it is, only scores leave."""
    """The public set every party may see (the server's auxiliary set; FedMKT's D_p)."""
    resources: SharedResources = field(default_factory=SharedResources)
    """Tokenizers and token bridges shared with the other parties of this process."""

    @classmethod
    def create(
        cls,
        config: ExperimentConfig,
        data: ExperimentData,
        client_id: int,
        slm: LoadedModel,
        resources: SharedResources | None = None,
        data_path: str | None = None,
        eval_path: str | None = None,
    ) -> ClientRuntime:
        """Client `client_id` with its training questions encoded for its SLM; `data_path` and
        `eval_path`: its own training and evaluation files where the node names them
        (`ExperimentData.client_records`, `client_eval_records`)."""
        requests = data.client_requests(config, client_id, data_path)
        local_eval = data.client_eval_requests(config, client_id, eval_path)
        resources = resources if resources is not None else SharedResources()
        resources.know(slm)
        return cls(
            client_id,
            slm,
            slm.encode_sft(requests, config.train.max_length),
            requests,
            eval_requests=data.eval_requests(config),
            public_requests=data.aux_requests(config),
            local_eval=local_eval,
            resources=resources,
        )

    def encoded_eval(self, config: ExperimentConfig) -> EncodedRequests:
        """The public evaluation set in this client's tokenisation, encoded once."""
        if "encoded_eval" not in self.state:
            self.state["encoded_eval"] = encode_requests(
                self.slm.tokenizer,
                multiple_choice(self.eval_requests),
                add_bos=self.slm.add_bos,
                max_length=scoring_length(self.slm.model, self.slm.tokenizer),
            )
        encoded: EncodedRequests = self.state["encoded_eval"]
        return encoded
