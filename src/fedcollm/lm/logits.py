"""Logits at the positions that carry a loss or a score, and nowhere else.

A causal LM's head turns every position's hidden state into a vocabulary-sized row; for
Gemma-3 (262k tokens) a batch of 4x256 positions would be 1 GiB of float32 logits of which only
the answer tokens are used. Here the decoder runs once, the hidden states of the target
positions are gathered, and only those rows go through the head.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import PreTrainedModel

from fedcollm.errors import FedcollmError
from fedcollm.lm.devices import model_device
from fedcollm.lm.encoding import Batch


def _causal_lm(model: PeftModel | PreTrainedModel) -> PreTrainedModel:
    return cast(PreTrainedModel, model.get_base_model()) if isinstance(model, PeftModel) else model


def target_logits(model: PeftModel | PreTrainedModel, batch: Batch) -> torch.Tensor:
    """Logits [P, V] at the positions of `batch.predict_mask` (row-major), in float32.

    The decoder and the head run in the model's dtype (bfloat16 base weights: bfloat16 matmuls);
    the few logit rows that carry a loss or a score are upcast to float32 before any softmax, so
    losses, KL terms and log-likelihoods are always computed in float32.
    """
    out = decoder_of(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    hidden = out.last_hidden_state[batch.predict_mask.to(out.last_hidden_state.device)]
    # Where a device map puts the head on another device, the losses still meet the batch there.
    return head_logits(model, hidden).to(batch.targets.device)


def decoder_of(model: PeftModel | PreTrainedModel) -> torch.nn.Module:
    """The model's decoder stack (embeddings and blocks, no LM head), adapters included."""
    return _causal_lm(model).get_decoder()


def head_logits(model: PeftModel | PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on decoder hidden states [P, H]: logits [P, V] in float32, exactly as the
    model's own forward computes them (its head's scaling and softcapping included)."""
    lm = _causal_lm(model)
    logits = lm.get_output_embeddings()(hidden).float()
    config = lm.config.get_text_config()
    # What transformers' forward does after the head, per architecture (none for most):
    # Cohere multiplies by `logit_scale`, Granite divides by `logits_scaling`, Gemma 2/3
    # softcap. `check_head` refuses a model whose forward does anything else.
    scale = getattr(lm, "logit_scale", None)
    if isinstance(scale, float | int):
        logits = logits * scale
    divisor = getattr(config, "logits_scaling", None)
    if divisor is not None:
        logits = logits / divisor
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


class HeadMismatchError(FedcollmError, ValueError):
    """A model whose own logits are not its LM head on the decoder's output, as `head_logits` has it."""


PROBE_TOKENS = 4
"""Length of the probe sequence `check_head` runs through a model once, at load."""


@torch.no_grad()
def check_head(model: PreTrainedModel, name: str) -> None:
    """Refuse a model whose forward transforms its logits in a way `head_logits` does not know.

    Training, distillation and evaluation all compute logits through the decoder and the head
    (`target_logits`), skipping the vocabulary-sized rows no loss uses; an architecture that
    scales or caps its logits after the head in some other way would silently get wrong ones.
    One forward of `PROBE_TOKENS` tokens both ways, at load time, turns that into an error.
    """
    was_training = model.training
    model.eval()
    try:
        vocab = model.get_output_embeddings().weight.shape[0]
        ids = torch.arange(1, PROBE_TOKENS + 1, device=model_device(model)).clamp(max=vocab - 1).unsqueeze(0)
        ours = head_logits(model, decoder_of(model)(input_ids=ids, use_cache=False).last_hidden_state[0])
        theirs = model(input_ids=ids, use_cache=False).logits[0].float().to(ours.device)
    finally:
        model.train(was_training)
    scale = theirs.abs().max().clamp(min=1e-6)
    # Rounding of the same matmuls differs by ~1e-7 relative in float32 and ~1e-2 in bfloat16;
    # every known post-head transform changes logits by far more (Cohere: x0.0625).
    tolerance = 1e-3 if model.dtype == torch.float32 else 5e-2
    if ((ours - theirs).abs().max() / scale).item() > tolerance:
        raise HeadMismatchError(
            f"model {name!r} ({model.config.model_type}): its forward transforms the LM head's logits "
            "in a way fedcollm does not reproduce (known: Gemma softcapping, Cohere logit_scale, "
            "Granite logits_scaling); add the transform to fedcollm.lm.logits.head_logits"
        )


def full_logits(model: PeftModel | PreTrainedModel, batch: Batch) -> torch.Tensor:
    """Reference path: the model's own forward over every position, then the same gather.

    Materialises B x L x V logits; used only by tests and the benchmark it is compared with.
    """
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return out.logits[batch.predict_mask].float()


def target_log_probs(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Log-probability [P] of each target token under its logits row."""
    return torch.log_softmax(logits, dim=-1).gather(1, batch.targets.unsqueeze(1)).squeeze(1)


def answer_cross_entropy(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over all target tokens of the batch (the SFT task loss)."""
    return F.cross_entropy(logits, batch.targets)


def per_sequence_sum(values: torch.Tensor, batch: Batch, size: int) -> torch.Tensor:
    """Sum a per-target quantity [P] into one value per batch row [size]."""
    out = torch.zeros(size, dtype=values.dtype, device=values.device)
    return out.index_add_(0, batch.rows, values)
