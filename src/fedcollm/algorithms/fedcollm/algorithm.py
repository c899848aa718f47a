"""FedCoLLM (Fan et al., 2024), Algorithm 1: FedAvg of SLM adapters, then server-side mutual
distillation between the LLM and the aggregated SLM on the auxiliary set (Eq. 4-6).
"""

from __future__ import annotations

from fedcollm.algorithms.base import register
from fedcollm.algorithms.baselines.fedavg import FedAvg
from fedcollm.align.bridge import TokenBridge
from fedcollm.lm.models import Arrays, get_adapter, set_adapter
from fedcollm.parties.runtime import Metric, Reporter, ServerRuntime, derive_seed, encode_sft, pad_id
from fedcollm.training.distill import mutual_distill, same_tokenizer


@register
class FedCoLLM(FedAvg):
    """FedAvg plus R epochs of mutual knowledge distillation on the server per round."""

    name = "fedcollm"
    uses_llm = True

    def server_update(
        self, server: ServerRuntime, aggregate: Arrays, rnd: int, reporter: Reporter
    ) -> list[Metric]:
        config = self.config
        llm, slm = server.model("llm"), server.slm
        assert config.llm is not None
        if not server.aux_requests:
            raise ValueError("FedCoLLM needs an auxiliary set on the server: set task.aux_fraction > 0")
        if "aux" not in server.state:
            max_length = config.train.max_length
            server.state["aux"] = (
                encode_sft(llm, server.aux_requests, max_length),
                encode_sft(slm, server.aux_requests, max_length),
            )
            if not same_tokenizer(llm.tokenizer, slm.tokenizer):
                reporter.phase(f"aligning vocabularies of {llm.name} and {slm.name} (MinED, cached)")
                to_slm = TokenBridge.build(llm.tokenizer, slm.tokenizer)
                server.state["bridges"] = (to_slm, to_slm.reversed())
        llm_examples, slm_examples = server.state["aux"]
        set_adapter(slm.model, aggregate)
        reporter.phase(f"round {rnd} · server distillation ({len(server.aux_requests)} examples)")
        result = mutual_distill(
            llm.model,
            slm.model,
            llm_examples,
            slm_examples,
            llm_pad_id=pad_id(llm),
            slm_pad_id=pad_id(slm),
            llm_lr=config.llm.lr,
            slm_lr=config.slm.lr,
            cfg=config.distill,
            train_cfg=config.train,
            seed=derive_seed(config.seed, rnd, 1),
            bridges=server.state.get("bridges"),
            on_step=reporter.step_callback(),
        )
        server.global_adapter = get_adapter(slm.model)
        return [
            Metric(rnd, "llm", None, "distill_loss", result.llm_loss),
            Metric(rnd, "slm", None, "distill_loss", result.slm_loss),
            Metric(rnd, "llm", None, "distill_kd", result.llm_kd),
            Metric(rnd, "slm", None, "distill_kd", result.slm_kd),
        ]
