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
    return head_logits(model, out.last_hidden_state[batch.predict_mask])


def decoder_of(model: PeftModel | PreTrainedModel) -> torch.nn.Module:
    """The model's decoder stack (embeddings and blocks, no LM head), adapters included."""
    return _causal_lm(model).get_decoder()


def head_logits(model: PeftModel | PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on decoder hidden states [P, H]: logits [P, V] in float32 (softcapped if the
    model's config says so), exactly as the model's own forward computes them."""
    lm = _causal_lm(model)
    logits = lm.get_output_embeddings()(hidden).float()
    softcap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


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
    out = torch.zeros(size, dtype=values.dtype)
    return out.index_add_(0, batch.rows, values)
