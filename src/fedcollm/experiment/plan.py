"""What an experiment will do, checked offline before anything trains (`fedcollm run --dry-run`).

Adapter sizes come from the model's configuration alone: the model is built on PyTorch's meta
device (no weights, no memory), LoRA is attached, and the parameters are counted. This needs only
`config.json` (offline alias, local folder, or a hub id already in the local HF cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from fedcollm.config import ExperimentConfig, LoraConfig
from fedcollm.data import load_questions
from fedcollm.lm.models import ALIASES, LORA_TARGETS, ModelError, resolve_model
from fedcollm.parties.runtime import dtype_text


@dataclass(frozen=True)
class AdapterSize:
    """Parameters of the full base model and of its LoRA adapter (the paper's Table 3)."""

    full_params: int
    adapter_params: int

    @property
    def percent(self) -> float:
        return 100.0 * self.adapter_params / self.full_params


def adapter_size(model_config: PretrainedConfig, lora: LoraConfig) -> AdapterSize:
    """Count base and LoRA parameters of an architecture without materialising any weight."""
    targets = list(lora.target_modules) or LORA_TARGETS.get(model_config.model_type)
    if not targets:
        raise ModelError(f"no default LoRA targets for {model_config.model_type!r}; set lora.target_modules")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    full = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(
        model,
        PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets),
    )
    adapter = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return AdapterSize(full, adapter)


def local_model_config(name: str) -> PretrainedConfig | None:
    """A model's configuration if it is available without the network, else None."""
    try:
        if name in ALIASES:
            return AutoConfig.from_pretrained(resolve_model(name))
        return AutoConfig.from_pretrained(resolve_model(name), local_files_only=True)
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class PlanLine:
    label: str
    value: str


def plan(
    config: ExperimentConfig, methods: list[str] | None = None, tasks: list[str] | None = None
) -> list[PlanLine]:
    """The plan of a run (or comparison), raising `DataError`/`ModelError` on what cannot work."""
    from fedcollm.algorithms import ALGORITHMS

    methods = methods or [config.algorithm]
    tasks = tasks or [config.task.name]
    unknown = sorted(set(methods) - set(ALGORITHMS))
    if unknown:
        raise ValueError(
            f"unknown method(s) {', '.join(unknown)}; available: {', '.join(sorted(ALGORITHMS))}"
        )
    for task in tasks:
        load_questions(task, config.task.train_split, config.task.source, limit=1)
        load_questions(task, config.eval.split or config.task.eval_split, config.task.source, limit=1)
    fed = config.federation
    lines = [
        PlanLine("methods", ", ".join(methods)),
        PlanLine("tasks", ", ".join(tasks) + f" (format {config.task.format}, source {config.task.source})"),
        PlanLine("rounds", str(fed.rounds)),
        PlanLine(
            "clients",
            f"{fed.num_clients} ({config.task.partition} split, "
            f"{config.task.aux_fraction:.0%} of the training questions to the server)",
        ),
        PlanLine("evaluation", f"{config.eval.split}, {config.eval.limit or 'all'} questions"),
        PlanLine("dtype", f"base models in {dtype_text(config.dtype)}, adapters in float32"),
    ]
    roles = [("slm", config.slm)] + ([("llm", config.llm)] if config.llm is not None else [])
    for role, model in roles:
        model_config = local_model_config(model.name)
        if model_config is None:
            size = "config not available offline (size unknown until downloaded)"
        else:
            s = adapter_size(model_config, model.lora)
            size = (
                f"{s.full_params / 1e6:.1f} M params, "
                f"adapter {s.adapter_params / 1e6:.3f} M ({s.percent:.2f}%)"
            )
        lines.append(PlanLine(role, f"{model.name}: {size}"))
    return lines


__all__ = ["AdapterSize", "PlanLine", "adapter_size", "local_model_config", "plan"]
