from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny import make_model


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=0)


@pytest.fixture(scope="session")
def tiny_llama_big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same tokenizer as `tiny_llama`, other weights: the 'LLM' of tiny co-tuning tests."""
    return make_model(tmp_path_factory.mktemp("tiny-llama-big"), "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_other_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama whose tokenizer differs from `tiny_llama`'s (smaller BPE vocabulary)."""
    return make_model(tmp_path_factory.mktemp("tiny-llama-othertok"), "llama", seed=2, vocab_size=270)
