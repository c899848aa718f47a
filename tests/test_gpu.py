"""CUDA: the tiny end-to-end runs agree with the CPU, QLoRA trains, memory levers hold on a GPU.

Marked `gpu` and skipped where CUDA is absent; `scripts/gpu_check.sh` runs them on a bare CUDA
machine (docs/gpu.md). Float32 and LoRA dropout 0 in the agreement tests: the CPU and the GPU
then differ only in kernel rounding, not in random draws.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedcollm.config import LoraConfig, TrainConfig, build_config
from fedcollm.engines import run_experiment
from fedcollm.lm.devices import model_device
from fedcollm.lm.encoding import collate, encode_pair
from fedcollm.lm.logits import answer_cross_entropy, target_logits
from fedcollm.lm.lora import get_adapter
from fedcollm.lm.models import Placement, load_with_lora
from fedcollm.training.sft import train_sft
from tests.device_guard import HostTensorGuard
from tests.helpers import ALGORITHM_CONFIGS, TinyModels, read_metrics, relative_l2, saved_adapter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)"),
]
CUDA = torch.device("cuda", 0)
PAIRS = [(f"Question: item {i} is?\nAnswer:", " b" if i % 2 else " a") for i in range(8)]


def _exact(data: dict[str, Any], device: str) -> dict[str, Any]:
    data = {**data, "device": device, "dtype": "float32"}
    for role in ("slm", "llm"):
        data[role] = {**data[role], "lora": {**data[role].get("lora", {}), "dropout": 0.0}}
    return data


@pytest.mark.parametrize("algorithm", ["fedcollm", "fedmkt", "fedavg"])
def test_a_tiny_run_on_cuda_agrees_with_the_same_run_on_the_cpu(
    algorithm: str, tiny_models: TinyModels, tmp_path: Path
) -> None:
    data = ALGORITHM_CONFIGS[algorithm](tiny_models)
    run_experiment(build_config(_exact(data, "cpu")), tmp_path / "cpu")
    guard = HostTensorGuard()
    with guard:
        run_experiment(build_config(_exact(data, "cuda")), tmp_path / "cuda")
    assert guard.problems == []
    for role in ("slm", "llm"):
        if (tmp_path / "cpu" / "adapters" / role).is_dir():
            assert (
                relative_l2(saved_adapter(tmp_path / "cuda", role), saved_adapter(tmp_path / "cpu", role))
                < 1e-3
            )
    losses = {
        name: [m["value"] for m in read_metrics(tmp_path / name) if m["metric"] == "train_loss"]
        for name in ("cpu", "cuda")
    }
    np.testing.assert_allclose(losses["cuda"], losses["cpu"], rtol=1e-3)


def test_a_4bit_llm_with_lora_trains_on_cuda(tiny_llama_wide: Path) -> None:
    where = Placement(device=CUDA, dtype=torch.bfloat16, quantization="4bit")
    lm = load_with_lora(str(tiny_llama_wide), LoraConfig(r=4, dropout=0.0), seed=0, where=where)
    assert model_device(lm.model) == CUDA
    assert any(type(m).__name__ == "Linear4bit" for m in lm.model.modules())
    assert {p.dtype for p in lm.model.parameters() if p.requires_grad} == {torch.float32}
    examples = [encode_pair(lm.tokenizer, c, a) for c, a in PAIRS]
    cfg = TrainConfig(batch_size=4)
    first = train_sft(lm.model, examples, pad_id=lm.pad_id, lr=1e-2, cfg=cfg, seed=0, epochs=1)
    later = train_sft(lm.model, examples, pad_id=lm.pad_id, lr=1e-2, cfg=cfg, seed=0, epochs=4)
    assert later.mean_loss < first.mean_loss


def _grads(lm: Any, checkpointing: bool) -> dict[str, torch.Tensor]:
    base = lm.model.get_base_model()
    if checkpointing:
        base.activation_checkpointing_enable({"use_reentrant": False})
    lm.model.train()
    lm.model.zero_grad(set_to_none=True)
    batch = collate(
        [encode_pair(lm.tokenizer, c, a) for c, a in PAIRS], lm.pad_id, device=model_device(lm.model)
    )
    answer_cross_entropy(target_logits(lm.model, batch), batch).backward()
    if checkpointing:
        base.activation_checkpointing_disable()
    return {n: p.grad.detach().clone() for n, p in lm.model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_gradients_on_cuda(tiny_llama: Path) -> None:
    lm = load_with_lora(str(tiny_llama), LoraConfig(r=4, dropout=0.0), seed=0, where=Placement(device=CUDA))
    rng = np.random.default_rng(0)
    from fedcollm.lm.lora import set_adapter

    set_adapter(
        lm.model, {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in lm.initial_adapter.items()}
    )
    plain, checkpointed = _grads(lm, False), _grads(lm, True)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_device_map_across_the_gpu_and_the_cpu_trains(tiny_llama: Path) -> None:
    device_map: dict[str, int | str] = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    lm = load_with_lora(
        str(tiny_llama), LoraConfig(r=4, dropout=0.0), seed=0, where=Placement(device_map=device_map)
    )
    devices = {p.device.type for p in lm.model.parameters()}
    assert devices == {"cuda", "cpu"}
    before = get_adapter(lm.model)
    examples = [encode_pair(lm.tokenizer, c, a) for c, a in PAIRS]
    result = train_sft(lm.model, examples, pad_id=lm.pad_id, lr=1e-2, cfg=TrainConfig(batch_size=4), seed=0)
    after = get_adapter(lm.model)
    assert np.isfinite(result.mean_loss)
    assert all(not np.array_equal(before[k], after[k]) for k in before if "lora_B" in k)
