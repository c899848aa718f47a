"""The architectures of the papers' models, known without the network.

`fedcollm run --dry-run` sizes adapters and plans memory from a model's `config.json`. For a hub
id that is not in the local cache there is none, so the plan of `configs/paper/s1..s3.toml` would
say nothing on a fresh machine. These are the shape fields of the six models the FedCoLLM paper
uses, as their hub `config.json` files give them (the fields that fix parameter counts and
activation sizes); a cached or local config always wins over this table.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

_GPT2 = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024}
_OPT = {
    "model_type": "opt",
    "vocab_size": 50272,
    "max_position_embeddings": 2048,
    "word_embed_proj_dim": None,
}
_LLAMA = {"model_type": "llama", "vocab_size": 32000, "max_position_embeddings": 4096}

KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "openai-community/gpt2": {**_GPT2, "n_embd": 768, "n_layer": 12, "n_head": 12},
    "openai-community/gpt2-large": {**_GPT2, "n_embd": 1280, "n_layer": 36, "n_head": 20},
    "facebook/opt-1.3b": {
        **_OPT,
        "hidden_size": 2048,
        "ffn_dim": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
    },
    "facebook/opt-6.7b": {
        **_OPT,
        "hidden_size": 4096,
        "ffn_dim": 16384,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    },
    "princeton-nlp/Sheared-LLaMA-1.3B": {
        **_LLAMA,
        "hidden_size": 2048,
        "intermediate_size": 5504,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
    },
    "meta-llama/Llama-2-7b-hf": {
        **_LLAMA,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    },
}
"""Shape fields of the papers' models by hub id (GPT-2 Small/Large, OPT-1.3B/6.7B, Sheared-LLaMA-1.3B,
LLaMa2-7B)."""


def known_config(name: str) -> PretrainedConfig | None:
    """The configuration of a paper model from `KNOWN_SHAPES`, or None for any other name."""
    shape = KNOWN_SHAPES.get(name)
    if shape is None:
        return None
    fields = {k: v for k, v in shape.items() if k != "model_type" and v is not None}
    if shape["model_type"] == "opt":
        fields["word_embed_proj_dim"] = fields["hidden_size"]
    return AutoConfig.for_model(shape["model_type"], **fields)
