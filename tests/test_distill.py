"""KL direction and where distillation gradients flow."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedcollm.algorithms.fedcollm.distillation import TokenizerMismatchError, distill_losses, mutual_distill
from fedcollm.config import DistillConfig, LoraConfig, TrainConfig
from fedcollm.lm.encoding import encode_pair
from fedcollm.lm.lora import get_adapter, set_adapter
from fedcollm.lm.models import Placement, load_with_lora
from fedcollm.training.kd import kd_loss, kd_loss_sparse


def test_kd_loss_is_kl_of_teacher_to_student() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    p_t, p_s = torch.softmax(t, -1), torch.softmax(s, -1)
    expected = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, t), expected)
    reverse = (p_s * (p_s.log() - p_t.log())).sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, t, direction="reverse"), reverse)
    assert not torch.allclose(expected, reverse)


def test_kd_loss_scales_with_temperature_squared() -> None:
    torch.manual_seed(1)
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    p_t, p_s = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    expected = (p_t * (p_t.log() - p_s.log())).sum(-1).mean() * 4
    torch.testing.assert_close(kd_loss(s, t, temperature=2.0), expected)


def test_sum_reduction_is_fate_llms_reference_kd_and_mean_is_its_average_times_t_squared() -> None:
    """`distill.kd_reduction = "sum"` computes FATE-LLM's `computing_kd_loss(...).sum()`."""
    torch.manual_seed(0)
    student, teacher = torch.randn(7, 11), torch.randn(7, 11)
    reference = torch.nn.functional.kl_div(
        torch.log_softmax(student, -1), torch.softmax(teacher, -1), reduction="none"
    ).sum()
    torch.testing.assert_close(kd_loss(student, teacher, reduction="sum"), reference)
    temperature = 2.0
    summed = kd_loss(student, teacher, temperature, reduction="sum")
    torch.testing.assert_close(kd_loss(student, teacher, temperature), summed / 7 * temperature**2)
    ids = torch.arange(11).repeat(7, 1)
    torch.testing.assert_close(kd_loss_sparse(student, ids, teacher, reduction="sum"), reference)
    assert DistillConfig().kd_reduction == "mean"


def test_kd_loss_is_zero_for_identical_distributions_and_gradient_only_reaches_student() -> None:
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    assert float(kd_loss(s, s.detach().clone())) == pytest.approx(0.0, abs=1e-6)
    kd_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-base"])
def test_mutual_distillation_moves_both_adapters_toward_each_other(
    tiny_llama: Path, tiny_llama_big: Path, dtype: torch.dtype
) -> None:
    llm = load_with_lora(
        str(tiny_llama_big), LoraConfig(r=4, dropout=0.0), seed=0, where=Placement(dtype=dtype)
    )
    slm = load_with_lora(str(tiny_llama), LoraConfig(r=4, dropout=0.0), seed=1, where=Placement(dtype=dtype))
    before_f, before_g = get_adapter(llm.model), get_adapter(slm.model)
    texts = [("Question: Plants need?\nAnswer:", " light"), ("The sun is", " a star")] * 2
    ex_f = [encode_pair(llm.tokenizer, c, a) for c, a in texts]
    ex_g = [encode_pair(slm.tokenizer, c, a) for c, a in texts]
    result = mutual_distill(
        llm.model,
        slm.model,
        ex_f,
        ex_g,
        llm_pad_id=0,
        slm_pad_id=0,
        llm_lr=1e-2,
        slm_lr=1e-2,
        cfg=DistillConfig(epochs=3, batch_size=2, kd_weight=1.0),
        train_cfg=TrainConfig(),
        seed=0,
    )
    assert result.steps == 6
    after_f, after_g = get_adapter(llm.model), get_adapter(slm.model)
    assert any(not np.array_equal(before_f[k], after_f[k]) for k in before_f)
    assert any(not np.array_equal(before_g[k], after_g[k]) for k in before_g)
    # With a bf16 base the adapters stay float32 (the optimizer state is float32 too).
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in [*after_f.values(), *after_g.values()])


def test_one_forward_per_model_each_loss_reaches_only_its_own_adapter(
    tiny_llama: Path, tiny_llama_big: Path
) -> None:
    """The shared forward must not leak: L_f trains only the LLM, L_g only the SLM."""
    texts = [("Question: Plants need?\nAnswer:", " light"), ("The sun is", " a star")]
    for loss_index, trained, untouched in ((0, "llm", "slm"), (1, "slm", "llm")):
        models = {
            "llm": load_with_lora(str(tiny_llama_big), LoraConfig(r=4, dropout=0.0), seed=0),
            "slm": load_with_lora(str(tiny_llama), LoraConfig(r=4, dropout=0.0), seed=1),
        }
        items = {name: [encode_pair(m.tokenizer, c, a) for c, a in texts] for name, m in models.items()}
        losses = distill_losses(
            models["llm"].model,
            models["slm"].model,
            items["llm"],
            items["slm"],
            llm_pad_id=0,
            slm_pad_id=0,
            cfg=DistillConfig(kd_weight=1.0),
        )
        assert float(losses[2]) > 0 and float(losses[3]) > 0  # the two models disagree
        losses[loss_index].backward()
        grads = {
            name: [p.grad for p in m.model.parameters() if p.requires_grad] for name, m in models.items()
        }
        assert all(g is not None for g in grads[trained]), trained
        assert any(float(g.abs().sum()) > 0 for g in grads[trained]), trained  # lora_B (A's is 0 at init)
        assert all(g is None for g in grads[untouched]), untouched


def test_distill_kd_reduction_reaches_fedcollms_losses(tiny_llama: Path) -> None:
    llm = load_with_lora(str(tiny_llama), LoraConfig(r=4, dropout=0.0), seed=0)
    slm = load_with_lora(str(tiny_llama), LoraConfig(r=4, dropout=0.0), seed=1)
    set_adapter(slm.model, {k: np.full_like(v, 0.05) for k, v in get_adapter(slm.model).items()})
    items = [encode_pair(llm.tokenizer, "Question: The sun is a\nAnswer:", " star. Water boils")]

    def kd_terms(reduction: str) -> tuple[float, float]:
        cfg = DistillConfig(kd_reduction=reduction)
        out = distill_losses(llm.model, slm.model, items, items, llm_pad_id=0, slm_pad_id=0, cfg=cfg)
        return float(out[2]), float(out[3])

    mean, summed = kd_terms("mean"), kd_terms("sum")
    assert mean[0] > 0 and mean[1] > 0
    np.testing.assert_allclose(summed, np.multiply(mean, items[0].n_target), rtol=1e-5)


def test_equal_answer_lengths_with_other_token_ids_are_not_compared_position_by_position(
    tiny_llama: Path,
) -> None:
    lm = load_with_lora(str(tiny_llama), LoraConfig(r=4), seed=0)
    item = encode_pair(lm.tokenizer, "Question: The sun is a\nAnswer:", " star")
    shifted = tuple((i + 1) % len(lm.tokenizer) for i in item.answer_ids)
    other = dataclasses.replace(item, input_ids=item.input_ids[: item.n_context] + shifted)
    assert other.n_target == item.n_target
    with pytest.raises(TokenizerMismatchError, match="token alignment is needed"):
        distill_losses(lm.model, lm.model, [item], [other], llm_pad_id=0, slm_pad_id=0, cfg=DistillConfig())


def test_different_tokenizers_without_alignment_stop_with_a_clear_message(
    tiny_llama: Path, tiny_other_tokenizer: Path
) -> None:
    llm = load_with_lora(str(tiny_other_tokenizer), LoraConfig(r=4), seed=0)
    slm = load_with_lora(str(tiny_llama), LoraConfig(r=4), seed=1)
    text = [("Question: Rocks are classified as\nAnswer:", " igneous, metamorphic, or sedimentary")]
    ex_f = [encode_pair(llm.tokenizer, c, a) for c, a in text]
    ex_g = [encode_pair(slm.tokenizer, c, a) for c, a in text]
    assert ex_f[0].n_target != ex_g[0].n_target
    with pytest.raises(TokenizerMismatchError, match="token alignment is needed"):
        mutual_distill(
            llm.model,
            slm.model,
            ex_f,
            ex_g,
            llm_pad_id=0,
            slm_pad_id=0,
            llm_lr=1e-3,
            slm_lr=1e-3,
            cfg=DistillConfig(),
            train_cfg=TrainConfig(),
            seed=0,
        )


def test_sparse_kd_with_the_whole_vocabulary_equals_dense_kd() -> None:
    torch.manual_seed(2)
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    ids = torch.arange(5).repeat(3, 1)
    torch.testing.assert_close(kd_loss_sparse(s, ids, t, temperature=2.0), kd_loss(s, t, temperature=2.0))


def test_sparse_kd_with_a_one_hot_teacher_is_cross_entropy_and_ignores_padding() -> None:
    torch.manual_seed(3)
    s = torch.randn(2, 6)
    ids = torch.tensor([[4, -1, -1], [1, -1, -1]])
    vals = torch.tensor([[0.0, float("-inf"), float("-inf")], [0.0, 7.0, 7.0]])
    expected = torch.nn.functional.cross_entropy(s, torch.tensor([4, 1]))
    torch.testing.assert_close(kd_loss_sparse(s, ids, vals), expected)
    with pytest.raises(ValueError, match="empty distribution"):
        kd_loss_sparse(s, torch.full((2, 3), -1), vals)


def _pair(tiny_llama: Path, tiny_llama_big: Path, dropout: float) -> tuple[Any, Any, list[Any], list[Any]]:
    llm = load_with_lora(str(tiny_llama_big), LoraConfig(r=4, dropout=dropout), seed=0)
    slm = load_with_lora(str(tiny_llama), LoraConfig(r=4, dropout=dropout), seed=1)
    for lm in (llm, slm):  # nonzero B so the adapter (and its input dropout) changes the logits
        set_adapter(lm.model, {k: np.full_like(v, 0.05) for k, v in get_adapter(lm.model).items()})
        lm.model.train()
    texts = [("Question: Plants need?\nAnswer:", " light and water"), ("The sun is", " a star")]
    items = [[encode_pair(lm.tokenizer, c, a) for c, a in texts] for lm in (llm, slm)]
    return llm, slm, items[0], items[1]


def test_teachers_are_dropout_free_eval_mode_logits(
    tiny_llama: Path, tiny_llama_big: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With LoRA dropout each KD term's target is the other model's eval-mode prediction, not
    its dropout-thinned training logits; the students still train in train mode."""
    from fedcollm.algorithms.fedcollm import distillation
    from fedcollm.lm.encoding import collate
    from fedcollm.lm.logits import target_logits

    llm, slm, items_f, items_g = _pair(tiny_llama, tiny_llama_big, dropout=0.5)
    teachers: list[torch.Tensor] = []
    real_kd = distillation.kd_loss

    def spy(student: torch.Tensor, teacher: torch.Tensor, *args: Any) -> torch.Tensor:
        teachers.append(teacher.detach().clone())
        return real_kd(student, teacher, *args)

    monkeypatch.setattr(distillation, "kd_loss", spy)
    torch.manual_seed(0)
    distill_losses(llm.model, slm.model, items_f, items_g, llm_pad_id=0, slm_pad_id=0, cfg=DistillConfig())
    assert llm.model.training and slm.model.training  # modes restored after the teacher passes
    llm.model.eval()
    slm.model.eval()
    with torch.no_grad():
        clean_g = target_logits(slm.model, collate(items_g, 0, device="cpu"))
        clean_f = target_logits(llm.model, collate(items_f, 0, device="cpu"))
    torch.testing.assert_close(teachers[0], clean_g)  # L_f's teacher: the SLM
    torch.testing.assert_close(teachers[1], clean_f)  # L_g's teacher: the LLM


@pytest.mark.parametrize(("dropout", "teacher_forwards"), [(0.0, 0), (0.1, 2)])
def test_a_second_forward_runs_only_where_dropout_is_active(
    tiny_llama: Path,
    tiny_llama_big: Path,
    monkeypatch: pytest.MonkeyPatch,
    dropout: float,
    teacher_forwards: int,
) -> None:
    from fedcollm.lm import dropout as dropout_module

    llm, slm, items_f, items_g = _pair(tiny_llama, tiny_llama_big, dropout=dropout)
    calls: list[int] = []
    real = dropout_module.target_logits

    def counting(*args: Any) -> torch.Tensor:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(dropout_module, "target_logits", counting)
    distill_losses(llm.model, slm.model, items_f, items_g, llm_pad_id=0, slm_pad_id=0, cfg=DistillConfig())
    assert len(calls) == teacher_forwards


@pytest.mark.parametrize(("arch", "active"), [("llama", False), ("gpt2", True), ("opt", True)])
def test_base_model_dropout_counts_as_active_in_training_only(
    tmp_path: Path, arch: str, active: bool
) -> None:
    """GPT-2 drops through modules, OPT functionally (`config.dropout`); Llama's rates are 0."""
    from fedcollm.lm.dropout import eval_mode, has_active_dropout
    from tests.tiny import make_model

    lm = load_with_lora(str(make_model(tmp_path / arch, arch)), LoraConfig(r=4, dropout=0.0), seed=0)
    lm.model.train()
    assert has_active_dropout(lm.model) is active
    with eval_mode(lm.model):
        assert not has_active_dropout(lm.model)
    assert all(m.training for m in lm.model.modules())
