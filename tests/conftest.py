from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import TinyModels
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
def tiny_llama_wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_llama_big` at hidden size 64: wide enough for bitsandbytes' 4-bit CPU kernels."""
    return make_model(tmp_path_factory.mktemp("tiny-llama-wide"), "llama", seed=1, width=64)


@pytest.fixture(scope="session")
def tiny_other_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama whose tokenizer differs from `tiny_llama`'s (smaller BPE vocabulary)."""
    return make_model(tmp_path_factory.mktemp("tiny-llama-othertok"), "llama", seed=2, vocab_size=270)


@pytest.fixture(scope="session")
def tiny_models(tiny_llama: Path, tiny_llama_big: Path, tiny_other_tokenizer: Path) -> TinyModels:
    """The three tiny models together, for `tests.helpers.ALGORITHM_CONFIGS`."""
    return TinyModels(slm=tiny_llama, llm=tiny_llama_big, other=tiny_other_tokenizer)


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps new messages with the running task's identity; pretend to be a ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
