"""Tiny randomly initialised models with a small trained tokenizer, saved as local folders.

Unit tests use these where the real model is not the point: they load in milliseconds and
exercise the same loading path (a local transformers folder) as real models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers import decoders as tk_decoders
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma3TextConfig,
    GPT2Config,
    GraniteConfig,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

CORPUS = [
    "Question: Which factor will most likely cause a person to develop a fever?\nAnswer:",
    " a leg muscle relaxing after exercise",
    " a bacterial population in the bloodstream",
    "Question: What is it called when you slowly cook using a grill?\nA. barbeque\nB. fry\nAnswer: A",
    "The sun is a star. Water boils at one hundred degrees. Plants need light to grow.",
    "Rocks are classified as igneous, metamorphic, or sedimentary according to how they formed.",
]


def make_tokenizer(folder: Path, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences; saved to `folder`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk_decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    fast.save_pretrained(folder)
    return fast


def _configs(vocab: int) -> dict[str, object]:
    common = {"vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    decoder = {  # the Llama-style shape shared by most families below
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    }
    return {
        "llama": LlamaConfig(**decoder, **common),
        "gpt2": GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **common),
        "opt": OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=512,
            **common,
        ),
        "qwen2": Qwen2Config(**decoder, **common),
        "gemma3_text": Gemma3TextConfig(
            **decoder,
            head_dim=8,
            sliding_window=64,
            final_logit_softcapping=30.0,
            **common,
        ),
        # Two heads that transform their logits after the LM head (x logit_scale, / logits_scaling),
        # at values far from 1 so that a shortcut forgetting them fails the logits tests.
        "cohere": CohereConfig(**decoder, logit_scale=0.25, **common),
        "granite": GraniteConfig(**decoder, logits_scaling=4.0, **common),
    }


ARCHITECTURES = tuple(_configs(10))


def make_model(
    folder: Path, arch: str = "llama", seed: int = 0, vocab_size: int = 300, width: int | None = None
) -> Path:
    """Save a tiny random model of `arch` with the tiny tokenizer into `folder`; return it.

    `width` sets a Llama's hidden size (MLP twice that): bitsandbytes' 4-bit CPU kernels need
    every quantised layer's output a multiple of 32 and its input of 64.
    """
    tokenizer = make_tokenizer(folder, vocab_size)
    config = _configs(len(tokenizer))[arch]
    if width is not None:
        config.hidden_size, config.intermediate_size = width, 2 * width
        config.head_dim = width // config.num_attention_heads
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return folder
