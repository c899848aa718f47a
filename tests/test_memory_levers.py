"""Memory levers of every trainer: gradient accumulation (`train.grad_accum_steps`) and
activation checkpointing (`train.gradient_checkpointing`) change memory, not the training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedcollm.config import LoraConfig, TrainConfig
from fedcollm.lm.encoding import encode_pair
from fedcollm.lm.lora import get_adapter
from fedcollm.lm.models import load_with_lora
from fedcollm.training import optimise as optimise_module
from fedcollm.training.sft import train_sft

# Every answer has the same number of tokens, so micro-batch means weighted by example share
# equal the whole batch's token mean exactly.
PAIRS = [(f"Question: item {i} is?\nAnswer:", " b") for i in range(8)]


def _train(tiny_llama: Path, **train: Any) -> tuple[dict[str, np.ndarray], float]:
    lm = load_with_lora(str(tiny_llama), LoraConfig(r=4, dropout=0.0), seed=0)
    examples = [encode_pair(lm.tokenizer, c, a) for c, a in PAIRS]
    assert len({e.n_target for e in examples}) == 1
    cfg = TrainConfig(batch_size=4, **train)
    result = train_sft(lm.model, examples, pad_id=lm.pad_id, lr=1e-2, cfg=cfg, seed=0, epochs=2)
    return get_adapter(lm.model), result.mean_loss


@pytest.mark.parametrize("micro_batches", [2, 4, 7])
def test_accumulating_micro_batches_gives_the_whole_batchs_steps(
    tiny_llama: Path, micro_batches: int
) -> None:
    whole, whole_loss = _train(tiny_llama)
    split, split_loss = _train(tiny_llama, grad_accum_steps=micro_batches)
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    for name, value in whole.items():
        np.testing.assert_allclose(split[name], value, rtol=1e-4, atol=1e-6)


def test_checkpointing_recomputes_instead_of_storing_and_trains_the_same(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bool] = []
    original = optimise_module._checkpointing

    def spy(model: Any, on: bool) -> None:
        original(model, on)
        calls.append(bool(model.get_base_model().is_activation_checkpointing))

    monkeypatch.setattr(optimise_module, "_checkpointing", spy)
    plain, plain_loss = _train(tiny_llama)
    checkpointed, checkpointed_loss = _train(tiny_llama, gradient_checkpointing=True)
    assert calls == [True, False]  # on for the training, off again after it
    assert checkpointed_loss == pytest.approx(plain_loss, rel=1e-5)
    for name, value in plain.items():
        np.testing.assert_allclose(checkpointed[name], value, rtol=1e-4, atol=1e-6)


def test_checkpointing_really_recomputes_the_forward(tiny_llama: Path) -> None:
    lm = load_with_lora(str(tiny_llama), LoraConfig(r=4, dropout=0.0), seed=0)
    # The attention holds the LoRA layers, so the backward needs its activations back; torch's
    # non-reentrant checkpoint stops recomputing once it has what the backward needs.
    attention = lm.model.get_base_model().model.layers[0].self_attn
    forwards = []
    attention.register_forward_hook(lambda *_: forwards.append(1))
    examples = [encode_pair(lm.tokenizer, c, a) for c, a in PAIRS[:4]]
    for flag in (False, True):
        forwards.clear()
        cfg = TrainConfig(batch_size=4, gradient_checkpointing=flag)
        train_sft(lm.model, examples, pad_id=lm.pad_id, lr=1e-3, cfg=cfg, seed=0, epochs=1)
        assert len(forwards) == (2 if flag else 1)  # the backward re-runs the attention once
    assert not lm.model.get_base_model().is_activation_checkpointing
    assert torch.is_grad_enabled()
