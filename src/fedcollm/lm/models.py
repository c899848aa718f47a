"""What a party holds of a language model: a frozen base model, its LoRA adapter, its tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedcollm.config import LoraConfig
from fedcollm.data.generative import TrainItem
from fedcollm.lm.encoding import Encoded, pad_id
from fedcollm.lm.loading import load_base_model, load_tokenizer, needs_bos
from fedcollm.lm.lora import attach_lora, get_adapter
from fedcollm.lm.training_items import encode_sft
from fedcollm.protocol import Arrays


@dataclass
class LoadedModel:
    """A base model with one LoRA adapter, its tokenizer, and the adapter as it was initialised."""

    name: str
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    initial_adapter: Arrays = field(default_factory=dict)
    """The adapter's weights right after `attach_lora`: where every party's training starts."""
    plain_template: str = "alpaca"
    """How conversations are rendered if the tokenizer has no chat template (`fedcollm.lm.chat`)."""

    @property
    def add_bos(self) -> bool:
        """Whether prompts start with BOS, as lm-evaluation-harness does for this tokenizer."""
        return needs_bos(self.tokenizer)

    @property
    def pad_id(self) -> int:
        """The token id that pads this model's batches."""
        return pad_id(self.tokenizer)

    def encode_sft(self, items: Sequence[TrainItem], max_length: int) -> list[Encoded]:
        """Training sequences in this model's tokenisation: context, then the target (a question's
        gold continuation, a short answer, a conversation's response)."""
        return encode_sft(
            self.tokenizer, items, add_bos=self.add_bos, max_length=max_length, plain=self.plain_template
        )


@dataclass(frozen=True)
class Placement:
    """Where a base model is held and how: device, compute dtype, weight storage, device map."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    quantization: str = "none"
    """ "none", "8bit" or "4bit" (bitsandbytes; `fedcollm.lm.loading.bitsandbytes_config`)."""
    device_map: str | dict[str, int | str] | None = None
    """ "auto": accelerate spreads the model over the visible devices (overrides `device`); or
    accelerate's explicit module -> device map."""


HOST = Placement()
"""A float32 model on the CPU, unquantised."""


def load_with_lora(
    name: str, lora: LoraConfig, seed: int, where: Placement = HOST, plain_template: str = "alpaca"
) -> LoadedModel:
    """Load a base model (frozen, placed and stored as `where` says) and its tokenizer, and attach
    a fresh float32 LoRA adapter (initialised on the host, so from the same seed on every device)."""
    tokenizer = load_tokenizer(name)
    base = load_base_model(
        name, where.dtype, device=where.device, quantization=where.quantization, device_map=where.device_map
    )
    model = attach_lora(base, lora, seed)
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        initial_adapter=get_adapter(model),
        plain_template=plain_template,
    )
