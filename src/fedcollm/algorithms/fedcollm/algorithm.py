"""FedCoLLM (Fan et al., 2024), Algorithm 1: FedAvg of SLM adapters, then server-side mutual
distillation between the LLM and the aggregated SLM on the auxiliary set (Eq. 4-6).

The client step and the aggregation are FedAvg's; the server step is `mutual_distill`
(`fedcollm.algorithms.fedcollm.distillation`), whose distilled SLM adapter is what the next
round broadcasts.
"""

from __future__ import annotations

from fedcollm.algorithms.baselines.fedavg import FedAvg
from fedcollm.algorithms.fedcollm.distillation import mutual_distill
from fedcollm.algorithms.registry import register
from fedcollm.algorithms.steps import round_span
from fedcollm.config import ExperimentConfig
from fedcollm.errors import FedcollmError
from fedcollm.lm.lora import get_adapter, set_adapter
from fedcollm.parties.server import ServerRuntime
from fedcollm.protocol import Arrays, Metric, Reporter, Seed, derive_seed


@register
class FedCoLLM(FedAvg):
    """FedAvg plus R epochs of mutual knowledge distillation on the server per round."""

    name = "fedcollm"
    uses_llm = True
    trains_llm_and_slm_together = True  # the mutual distillation steps both adapters per batch

    @classmethod
    def needs_auxiliary_set(cls, config: ExperimentConfig) -> bool:
        return True

    def server_update(
        self, server: ServerRuntime, aggregate: Arrays, rnd: int, reporter: Reporter
    ) -> list[Metric]:
        config = self.config
        llm, slm = server.model("llm"), server.slm
        if config.llm is None or not server.aux_requests:
            raise FedcollmError("FedCoLLM needs an LLM and an auxiliary set (Algorithm.check_config)")
        if "aux" not in server.state:
            max_length = config.train.max_length
            server.state["aux"] = (
                llm.encode_sft(server.aux_requests, max_length),
                slm.encode_sft(server.aux_requests, max_length),
            )
        if "bridges" not in server.state:
            reporter.phase(
                f"token bridge between {llm.name} and {slm.name} (MinED where they differ, cached)"
            )
            to_slm = server.resources.bridge(llm.name, slm.name)
            to_llm = server.resources.bridge(slm.name, llm.name)
            server.state["bridges"] = None if to_slm is None or to_llm is None else (to_slm, to_llm)
        llm_examples, slm_examples = server.state["aux"]
        set_adapter(slm.model, aggregate)
        reporter.phase(f"round {rnd} · server distillation ({len(server.aux_requests)} examples)")
        result = mutual_distill(
            llm.model,
            slm.model,
            llm_examples,
            slm_examples,
            llm_pad_id=llm.pad_id,
            slm_pad_id=slm.pad_id,
            llm_lr=config.llm.lr,
            slm_lr=config.slm.lr,
            cfg=config.distill,
            train_cfg=config.train,
            seed=derive_seed(config.seed, Seed.DISTILL, rnd),
            bridges=server.state["bridges"],
            on_step=reporter.step_callback(),
            span=round_span(config, rnd),
        )
        server.global_adapter = get_adapter(slm.model)
        return [
            Metric(rnd, "llm", None, "distill_loss", result.llm_loss),
            Metric(rnd, "slm", None, "distill_loss", result.slm_loss),
            Metric(rnd, "llm", None, "distill_kd", result.llm_kd),
            Metric(rnd, "slm", None, "distill_kd", result.slm_kd),
        ]
