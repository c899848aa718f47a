"""bfloat16 base weights with float32 LoRA adapters: training and evaluation.

Distillation in bf16 is covered by the dtype matrix of tests/test_distill.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedcollm.config import LoraConfig, TrainConfig
from fedcollm.data import MCRequest
from fedcollm.evaluation.multiple_choice import encode_requests, sequence_loglikelihoods
from fedcollm.lm.encoding import collate, encode_pair
from fedcollm.lm.logits import answer_cross_entropy, target_logits
from fedcollm.lm.lora import get_adapter, set_adapter
from fedcollm.lm.models import Placement, load_with_lora
from fedcollm.training.sft import train_sft

TEXTS = [
    ("Question: Plants need what to grow?\nAnswer:", " light"),
    ("The sun is", " a star"),
    ("Question: Water boils at?\nAnswer:", " one hundred degrees"),
    ("Rocks are classified as", " igneous, metamorphic, or sedimentary"),
]


def _lora() -> LoraConfig:
    return LoraConfig(r=4, dropout=0.0)


def test_bf16_base_keeps_float32_adapters_and_float32_logits(tiny_llama: Path) -> None:
    lm = load_with_lora(str(tiny_llama), _lora(), seed=0, where=Placement(dtype=torch.bfloat16))
    trainable = [p for p in lm.model.parameters() if p.requires_grad]
    frozen = [p for p in lm.model.parameters() if not p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    assert lm.model.get_base_model().config._attn_implementation == "eager"  # faster than SDPA in bf16
    assert all(a.dtype == np.float32 for a in get_adapter(lm.model).values())
    batch = collate([encode_pair(lm.tokenizer, c, a) for c, a in TEXTS], 0, device="cpu")
    logits = target_logits(lm.model, batch)
    assert logits.dtype == torch.float32
    loss = answer_cross_entropy(logits, batch)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)


def test_bf16_training_lowers_the_loss_and_tracks_fp32(tiny_llama: Path) -> None:
    results, adapters = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        lm = load_with_lora(str(tiny_llama), _lora(), seed=0, where=Placement(dtype=dtype))
        examples = [encode_pair(lm.tokenizer, c, a) for c, a in TEXTS]
        batch = collate(examples, 0, device="cpu")
        with torch.no_grad():
            before = float(answer_cross_entropy(target_logits(lm.model, batch), batch))
        train_sft(lm.model, examples * 8, pad_id=0, lr=3e-2, cfg=TrainConfig(batch_size=4), seed=0)
        with torch.no_grad():
            after = float(answer_cross_entropy(target_logits(lm.model, batch), batch))
        assert after < before - 0.05, (dtype, before, after)
        results[dtype] = (before, after)
        adapters[dtype] = get_adapter(lm.model)
        assert all(a.dtype == np.float32 for a in adapters[dtype].values())
    # Same data, seed and initial adapter: the bf16 run ends near the fp32 one.
    (b32, a32), (b16, a16) = results[torch.float32], results[torch.bfloat16]
    assert abs(b16 - b32) < 0.02 * b32
    assert abs(a16 - a32) < 0.02 * b32
    diff = sum(
        float(np.sum((adapters[torch.bfloat16][k] - v) ** 2)) for k, v in adapters[torch.float32].items()
    )
    norm = sum(float(np.sum(v**2)) for v in adapters[torch.float32].values())
    assert diff / norm < 0.05


def test_bf16_evaluation_scores_close_to_fp32(tiny_llama: Path) -> None:
    requests = [
        MCRequest(
            id=str(i),
            context=c,
            continuations=(a, " water", " the moon"),
            choice_texts=(a.strip(), "water", "the moon"),
            gold=0,
        )
        for i, (c, a) in enumerate(TEXTS)
    ]
    scores = {}
    adapter = None
    for dtype in (torch.float32, torch.bfloat16):
        lm = load_with_lora(str(tiny_llama), _lora(), seed=0, where=Placement(dtype=dtype))
        if adapter is None:  # a non-trivial adapter, the same in both
            adapter = {k: np.full_like(v, 0.01) for k, v in get_adapter(lm.model).items()}
        set_adapter(lm.model, adapter)
        encoded = encode_requests(lm.tokenizer, requests, add_bos=False)
        scores[dtype] = sequence_loglikelihoods(lm.model, encoded.sequences, 0, batch_size=4)
    fp32, bf16 = scores[torch.float32], scores[torch.bfloat16]
    assert bf16.dtype == np.float64
    np.testing.assert_allclose(bf16, fp32, rtol=0.05, atol=0.1)


def test_forcing_bfloat16_without_native_support_is_warned_about_in_the_plan_and_the_run(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from fedcollm.config import build_config
    from fedcollm.experiment.plan import plan
    from fedcollm.lm import precision
    from fedcollm.parties.loading import load_models
    from tests.helpers import tiny_config

    monkeypatch.setattr(precision, "native_bfloat16", lambda: False)
    assert precision.dtype_warning("auto") is None and precision.dtype_warning("float32") is None
    assert precision.torch_dtype("auto") == torch.float32  # auto never picks emulated bf16
    forced = build_config(tiny_config(tiny_llama, tiny_llama, algorithm="fedavg", dtype="bfloat16"))
    lines = {line.label: line.value for line in plan(forced)}
    assert "emulates it" in lines["warning"] and 'use dtype = "auto" or "float32"' in lines["warning"]
    with caplog.at_level("WARNING", logger="fedcollm.parties.loading"):
        load_models(forced, with_llm=False)
    assert any("without native bfloat16" in r.message for r in caplog.records)
    monkeypatch.setattr(precision, "native_bfloat16", lambda: True)
    assert precision.dtype_warning("bfloat16") is None


@pytest.mark.parametrize(
    ("kernels", "hardware", "native"),
    [
        ("AVX512", {"avx512_bf16": True}, True),
        ("AVX512", {"amx_bf16": True}, True),
        ("AVX512", {"avx512_bf16": False, "amx_bf16": False}, False),
        ("AVX2", {"avx512_bf16": True, "amx_bf16": True}, False),  # ATEN_CPU_CAPABILITY=avx2
        ("DEFAULT", {"avx512_bf16": True}, False),
    ],
)
def test_native_bfloat16_needs_the_hardware_and_avx512_kernels(
    monkeypatch: pytest.MonkeyPatch, kernels: str, hardware: dict[str, bool], native: bool
) -> None:
    """A bf16 CPU whose torch kernels are limited to AVX2 runs as an AVX2-only machine: auto is float32."""
    from fedcollm.lm import precision

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: kernels)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: hardware)
    assert precision.native_bfloat16() is native
    assert precision.torch_dtype("auto") == (torch.bfloat16 if native else torch.float32)
