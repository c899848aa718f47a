"""LoRA adapters on frozen base models, and adapters as named float32 arrays.

Adapters are what travels between the parties of a run: `get_adapter` and `set_adapter` move
them in and out of a model as `Arrays` (names in a stable order), `save_adapter` writes the peft
format a user loads with `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import numpy as np
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel

from fedcollm.config import LoraConfig
from fedcollm.lm.devices import from_numpy, to_numpy
from fedcollm.lm.loading import ModelError, exception_summary
from fedcollm.protocol import Arrays

LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "cohere": ["q_proj", "v_proj"],
    "cohere2": ["q_proj", "v_proj"],
    "granite": ["q_proj", "v_proj"],
    "olmo": ["q_proj", "v_proj"],
    "olmo2": ["q_proj", "v_proj"],
}
"""Default LoRA targets per architecture (the attention query/value projections)."""


def lora_targets(model: PreTrainedModel, lora: LoraConfig) -> list[str]:
    """The modules LoRA adapts: the config's list if given, else the architecture's default."""
    if lora.target_modules:
        return list(lora.target_modules)
    model_type = model.config.model_type
    if model_type not in LORA_TARGETS:
        raise ModelError(
            f"no default LoRA target modules for architecture {model_type!r}; set "
            f"lora.target_modules (known architectures: {', '.join(sorted(LORA_TARGETS))})"
        )
    return LORA_TARGETS[model_type]


def attach_lora(model: PreTrainedModel, lora: LoraConfig, seed: int) -> PeftModel:
    """Wrap a frozen base model with a fresh LoRA adapter initialised from `seed`.

    The adapter is float32 whatever the base model's dtype: with bfloat16 base weights the
    frozen matmuls run in bfloat16 while the adapter, its gradients and the AdamW state stay
    float32 (peft's `autocast_adapter_dtype` upcasts the adapter; peft casts its input up and its
    output back to the base layer's dtype). Checked here, as training in bfloat16 adapters would
    silently lose most of each small update.
    """
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int; alpha / r is float math
        lora_dropout=lora.dropout,
        target_modules=lora_targets(model, lora),
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 still reads transformers' deprecated `is_gradient_checkpointing`, which warns
        # on every wrap in transformers 5; the warning is theirs and says nothing about this run.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    wrong = {p.dtype for p in peft_model.parameters() if p.requires_grad} - {torch.float32}
    if wrong:
        raise ModelError(f"LoRA adapter parameters are {sorted(map(str, wrong))}, expected torch.float32")
    return peft_model


def get_adapter(model: PeftModel) -> Arrays:
    """The adapter's weights as named float32 arrays (copies), in a stable name order."""
    state = get_peft_model_state_dict(model)
    return {k: to_numpy(state[k].to(torch.float32)).copy() for k in sorted(state)}


def adapter_is_identity(model: PeftModel) -> bool:
    """Whether the LoRA adapter leaves the base model's outputs unchanged: every B matrix is zero.

    So it is right after `attach_lora` (peft initialises B to zero) and before any training; the
    model then scores exactly as its base model does.
    """
    found = False
    for name, param in model.named_parameters():
        if "lora_B" in name:
            found = True
            if bool(param.detach().any()):
                return False
    return found


def set_adapter(model: PeftModel, arrays: Mapping[str, np.ndarray]) -> None:
    """Load named arrays into the adapter; names and shapes must match exactly."""
    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ModelError(f"adapter names differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, value in arrays.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ModelError(
                f"adapter {key}: shape {tuple(value.shape)} != expected {tuple(expected[key].shape)}"
            )
    # set_peft_model_state_dict copies each value into its parameter, on that parameter's device.
    host = torch.device("cpu")
    state = {k: from_numpy(np.asarray(v, dtype=np.float32), host) for k, v in arrays.items()}
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ModelError(f"adapter keys not consumed by the model: {unexpected[:3]}")


def save_adapter(model: PeftModel, folder: Path, arrays: Mapping[str, np.ndarray] | None = None) -> None:
    """Save an adapter in peft format (loadable with `PeftModel.from_pretrained`)."""
    if arrays is not None:
        set_adapter(model, arrays)
    # peft keeps target_modules as a set and writes it in set order, which changes with each
    # process's string-hash seed; a sorted list makes the same adapter the same file every time.
    config = cast(PeftLoraConfig, model.peft_config[model.active_adapter])
    modules = config.target_modules
    if isinstance(modules, set):
        config.target_modules = sorted(modules)
    try:
        model.save_pretrained(str(folder))
    finally:
        config.target_modules = modules


def count_parameters(model: torch.nn.Module) -> int:
    """All parameters of a model counted once (tied weights once)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def count_base_parameters(model: PeftModel | PreTrainedModel) -> int:
    """Parameters of the base model without any adapter (the paper's 'full model')."""
    total = count_parameters(model)
    if isinstance(model, PeftModel):
        total -= sum(int(np.prod(v.shape)) for v in get_adapter(model).values())
    return total


def load_adapter(model: PreTrainedModel, folder: Path) -> PeftModel:
    """A saved peft adapter (`save_adapter`'s folder) applied to `model`, for evaluation."""
    if not (folder / "adapter_config.json").is_file():
        raise ModelError(f"{folder} is not a peft adapter folder (no adapter_config.json)")
    try:
        return PeftModel.from_pretrained(model, str(folder))
    except Exception as exc:
        # peft and safetensors fail on a corrupt or mismatched adapter with many exception
        # types (JSON, safetensors, shape and key errors); the folder is the culprit for each.
        raise ModelError(f"cannot load the adapter in {folder}: {exception_summary(exc)}") from None
