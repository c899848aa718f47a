"""Quantised base models (QLoRA) and float16 compute: bitsandbytes' 4-bit NF4 and 8-bit storage
of the frozen weights, trained through a float32 LoRA adapter, on this machine's CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedcollm.config import LoraConfig, TrainConfig, build_config
from fedcollm.data import MCRequest
from fedcollm.engines import run_experiment
from fedcollm.evaluation.multiple_choice import encode_requests, sequence_loglikelihoods
from fedcollm.lm.devices import model_device
from fedcollm.lm.encoding import encode_pair
from fedcollm.lm.loading import ModelError, load_base_model
from fedcollm.lm.lora import get_adapter
from fedcollm.lm.models import Placement, load_with_lora
from fedcollm.lm.precision import compute_dtype
from fedcollm.training import optimise as optimise_module
from fedcollm.training.sft import train_sft
from tests.device_guard import HostTensorGuard
from tests.helpers import ALGORITHM_CONFIGS, TinyModels, read_metrics

bnb = pytest.importorskip("bitsandbytes")

PAIRS = [(f"Question: item {i} is?\nAnswer:", " b" if i % 2 else " a") for i in range(8)]


def _requests() -> list[MCRequest]:
    return [
        MCRequest(f"q{i}", f"Question: item {i} is?\nAnswer:", (" a", " b", " c"), ("a", "b", "c"), i % 3)
        for i in range(12)
    ]


def _loglik(model: Any, tokenizer: Any) -> np.ndarray:
    encoded = encode_requests(tokenizer, _requests(), add_bos=False)
    return sequence_loglikelihoods(model, encoded.sequences, 0, batch_size=8)


@pytest.mark.parametrize(("quantization", "layer"), [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_a_quantised_base_stores_its_linear_layers_in_bitsandbytes_and_scores_close_to_full_precision(
    tiny_llama_wide: Path, quantization: str, layer: str
) -> None:
    full = load_base_model(str(tiny_llama_wide))
    quantised = load_base_model(str(tiny_llama_wide), quantization=quantization)
    kinds = {type(m).__name__ for m in quantised.modules()}
    assert layer in kinds
    assert quantised.get_memory_footprint() < full.get_memory_footprint()
    from fedcollm.lm.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_llama_wide))
    a, b = _loglik(full, tokenizer), _loglik(quantised, tokenizer)
    assert np.isfinite(b).all()
    # The same model, rounded: log-likelihoods move a little, in the same direction.
    assert np.corrcoef(a, b)[0, 1] > 0.9
    assert np.abs(a - b).mean() < 0.1 * np.abs(a).mean()


def test_qlora_trains_a_float32_adapter_on_a_4bit_base(tiny_llama_wide: Path) -> None:
    lm = load_with_lora(
        str(tiny_llama_wide), LoraConfig(r=4, dropout=0.0), seed=0, where=Placement(quantization="4bit")
    )
    assert {p.dtype for p in lm.model.parameters() if p.requires_grad} == {torch.float32}
    examples = [encode_pair(lm.tokenizer, c, a) for c, a in PAIRS]
    before = get_adapter(lm.model)
    cfg = TrainConfig(batch_size=4)
    first = train_sft(lm.model, examples, pad_id=lm.pad_id, lr=1e-2, cfg=cfg, seed=0, epochs=1)
    later = train_sft(lm.model, examples, pad_id=lm.pad_id, lr=1e-2, cfg=cfg, seed=0, epochs=4)
    after = get_adapter(lm.model)
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    assert later.mean_loss < first.mean_loss


def test_an_unknown_quantization_is_refused_by_the_config() -> None:
    from fedcollm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"llm\.quantization"):
        load_config(None, ["llm.quantization=3bit"])
    with pytest.raises(ModelError, match="unknown quantization"):
        load_base_model("smollm2-135m", quantization="2bit")


def test_fedcollm_runs_with_a_4bit_server_llm_and_every_tensor_on_its_device(
    tiny_models: TinyModels, tiny_llama_wide: Path, tmp_path: Path
) -> None:
    data = ALGORITHM_CONFIGS["fedcollm"](tiny_models)
    data["llm"] = {**data["llm"], "name": str(tiny_llama_wide), "quantization": "4bit"}
    data["federation"] = {**data["federation"], "rounds": 1}
    guard = HostTensorGuard()
    with guard:
        run_experiment(build_config(data), tmp_path / "run")
    assert guard.problems == []
    metrics = read_metrics(tmp_path / "run")
    assert any(m["role"] == "llm" and m["metric"] == "acc" and m["round"] == 1 for m in metrics)
    assert "float32" in (tmp_path / "run" / "config.toml").read_text()


def test_float16_compute_scales_the_loss_and_trains_like_float32(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Any] = []
    original = optimise_module.loss_scaler

    def spy(models: Any) -> Any:
        scaler = original(models)
        made.append(scaler)
        return scaler

    monkeypatch.setattr(optimise_module, "loss_scaler", spy)
    adapters = {}
    for dtype in (torch.float32, torch.float16):
        lm = load_with_lora(
            str(tiny_llama), LoraConfig(r=4, dropout=0.0), seed=0, where=Placement(dtype=dtype)
        )
        assert compute_dtype(lm.model.get_base_model()) == dtype
        examples = [encode_pair(lm.tokenizer, c, a) for c, a in PAIRS]
        train_sft(
            lm.model, examples, pad_id=lm.pad_id, lr=1e-2, cfg=TrainConfig(batch_size=4), seed=0, epochs=2
        )
        adapters[dtype] = get_adapter(lm.model)
    assert made[0] is None and made[1] is not None  # a scaler for float16 only
    assert made[1].get_scale() > 1.0
    for name, value in adapters[torch.float32].items():
        np.testing.assert_allclose(adapters[torch.float16][name], value, rtol=0.05, atol=2e-3)


def test_device_map_auto_places_a_model_that_trains(tiny_llama: Path) -> None:
    lm = load_with_lora(
        str(tiny_llama), LoraConfig(r=4, dropout=0.0), seed=0, where=Placement(device_map="auto")
    )
    # With no GPU, accelerate's "auto" map is the CPU; the spread over GPUs is tests/test_gpu.py's.
    assert model_device(lm.model) == torch.device("cpu")
    examples = [encode_pair(lm.tokenizer, c, a) for c, a in PAIRS]
    result = train_sft(lm.model, examples, pad_id=lm.pad_id, lr=1e-2, cfg=TrainConfig(batch_size=4), seed=0)
    assert np.isfinite(result.mean_loss) and result.steps == 2


def test_a_4bit_base_passes_gradients_down_to_every_lora_layer_after_an_evaluation(
    tiny_llama_wide: Path,
) -> None:
    """The LoRA gradients of a 4-bit model, after the eval-mode forwards that loading and scoring
    run, equal those of a float32 model holding the same (dequantised) weights."""
    from bitsandbytes.functional import dequantize_4bit

    from fedcollm.lm.encoding import collate
    from fedcollm.lm.logits import answer_cross_entropy, target_logits
    from fedcollm.lm.lora import set_adapter

    lora = LoraConfig(r=4, dropout=0.0)
    quantised = load_with_lora(str(tiny_llama_wide), lora, seed=0, where=Placement(quantization="4bit"))
    _loglik(quantised.model, quantised.tokenizer)  # an evaluation first, as every run has
    reference = load_with_lora(str(tiny_llama_wide), lora, seed=0)
    plain = dict(reference.model.get_base_model().named_modules())
    for name, module in quantised.model.get_base_model().named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = dequantize_4bit(module.weight.data, module.weight.quant_state)
            plain[name].weight.data.copy_(weight.to(torch.float32))
    rng = np.random.default_rng(0)
    adapter = {
        k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in quantised.initial_adapter.items()
    }
    grads = []
    for lm in (quantised, reference):
        set_adapter(lm.model, adapter)
        lm.model.train()
        batch = collate([encode_pair(lm.tokenizer, c, a) for c, a in PAIRS], lm.pad_id, device="cpu")
        answer_cross_entropy(target_logits(lm.model, batch), batch).backward()
        grads.append({n: p.grad.clone() for n, p in lm.model.named_parameters() if p.requires_grad})
    assert any("layers.0." in n for n in grads[0])
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-3, atol=1e-5, msg=name)
