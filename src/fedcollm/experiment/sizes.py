"""Model sizes from configurations alone: no weight is read or materialised.

The model is built on PyTorch's meta device (no weights, no memory), LoRA is attached, and the
parameters are counted. This needs only `config.json` (offline alias, local folder, a hub id
already in the local HF cache, or one of the papers' models in `fedcollm.experiment.shapes`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from fedcollm.config import LoraConfig
from fedcollm.experiment.shapes import known_config
from fedcollm.lm.loading import ModelError, resolve_model
from fedcollm.lm.lora import LORA_TARGETS


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
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` (see lm.lora.attach_lora).
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(
            model,
            PeftLoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int; alpha / r is float math
                lora_dropout=lora.dropout,
                target_modules=targets,
            ),
        )
    adapter = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return AdapterSize(full, adapter)


def local_model_config(name: str) -> PretrainedConfig | None:
    """A model's configuration if it is available without the network (for a hub id not in
    the local cache: the papers' models' shapes, `known_config`), else None. A name that can
    never load raises `ModelError`."""
    source = resolve_model(name)
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as exc:
        if Path(source).is_dir():
            raise ModelError(f"model {name!r}: cannot read {Path(source) / 'config.json'}: {exc}") from None
        return known_config(name)
