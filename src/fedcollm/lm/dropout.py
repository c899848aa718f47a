"""Dropout-free teacher logits: whether a training forward is noisy, and a clean one if it is.

Knowledge distillation's teacher targets should be the teacher's own prediction, not one
randomly thinned by dropout: the reference implementations compute them in eval mode. Where a
model's training forward runs no dropout (LoRA dropout 0 on a base model without dropout, e.g.
Llama, Gemma or SmolLM2 as configured), its training logits, detached, already are that
prediction and a second forward would only cost time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from numbers import Real

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from fedcollm.lm.encoding import Batch
from fedcollm.lm.logits import target_logits


def _config_dropouts(model: torch.nn.Module) -> list[float]:
    """The dropout rates a transformers config declares (``dropout``, ``attention_dropout``,
    ``resid_pdrop``, ...), which some architectures apply functionally rather than as modules
    (OPT's ``nn.functional.dropout(p=config.dropout)``, Llama's attention dropout)."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    items = config.get_text_config().to_dict().items()
    named = [(n, v) for n, v in items if "dropout" in n or n.endswith("pdrop")]
    return [float(v) for _, v in named if isinstance(v, Real) and not isinstance(v, bool)]


def has_active_dropout(model: PeftModel | PreTrainedModel) -> bool:
    """Whether a forward of `model` in its current mode can drop activations.

    True in training mode when any `nn.Dropout` module (LoRA's, GPT-2's) has p > 0 or the base
    config declares a positive dropout rate; always False in eval mode.
    """
    if not model.training:
        return False
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return any(rate > 0 for rate in _config_dropouts(base))


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block, each one's own mode restored after it."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def teacher_logits(
    model: PeftModel | PreTrainedModel, batch: Batch, training_logits: torch.Tensor
) -> torch.Tensor:
    """`model`'s dropout-free logits on `batch` as a teacher: detached, [P, V] like `target_logits`.

    `training_logits` (this batch's logits from the model's own training forward) are reused when
    that forward ran no dropout; otherwise one no-grad forward in eval mode computes them.
    """
    if not has_active_dropout(model):
        return training_logits.detach()
    with torch.no_grad(), eval_mode(model):
        return target_logits(model, batch)
