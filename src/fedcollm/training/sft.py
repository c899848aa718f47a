"""Supervised LoRA fine-tuning with the loss on answer tokens only.

Used by every algorithm that trains on labelled data: clients' local updates, Standalone,
FedAvg, the Centralized baseline and CrossLM's weighted likelihood on synthetic examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel

from fedcollm.config import TrainConfig
from fedcollm.errors import FedcollmError
from fedcollm.lm.devices import model_device
from fedcollm.lm.encoding import Batch, Encoded, collate
from fedcollm.lm.logits import answer_cross_entropy, target_logits
from fedcollm.protocol import StepCallback
from fedcollm.training.optimise import ONE_ROUND, ScheduleSpan, optimise


class TrainingError(FedcollmError, ValueError):
    """Training that cannot start: no examples (with a positive weight), or invalid weights."""


@dataclass(frozen=True)
class TrainResult:
    steps: int
    mean_loss: float
    num_examples: int


def weighted_answer_cross_entropy(logits: torch.Tensor, batch: Batch, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over the batch's sequences of each one's mean answer-token cross-entropy.

    `weights` [B] are >= 0. Rows of weight 0 are dropped before any loss term is formed, so they
    contribute exactly zero gradient and do not enter the normaliser (the number of rows with a
    positive weight); with all weights 1 and one target token per row this equals
    `answer_cross_entropy`. Per-sequence means keep a one-token answer and a 60-token example
    on the same footing (CrossLM trains on both).
    """
    keep = weights[batch.rows] > 0
    rows = batch.rows[keep]
    token_ce = F.cross_entropy(logits[keep], batch.targets[keep], reduction="none")
    size = weights.numel()
    per_row = torch.zeros(size, dtype=token_ce.dtype, device=token_ce.device).index_add(0, rows, token_ce)
    counts = torch.zeros_like(per_row).index_add(0, rows, torch.ones_like(token_ce))
    positive = weights > 0
    mean_ce = per_row[positive] / counts[positive]
    return (weights[positive].to(mean_ce.dtype) * mean_ce).sum() / positive.sum().clamp(min=1)


def train_sft(
    model: PeftModel,
    examples: Sequence[Encoded],
    *,
    pad_id: int,
    lr: float,
    cfg: TrainConfig,
    seed: int,
    epochs: int | None = None,
    on_step: StepCallback | None = None,
    weights: Sequence[float] | None = None,
    span: ScheduleSpan = ONE_ROUND,
) -> TrainResult:
    """Fine-tune the model's adapter on `examples` for `epochs` (default `cfg.epochs`).

    `weights` (one per example, >= 0) turns the loss into a weighted likelihood
    (`weighted_answer_cross_entropy`); examples of weight 0 are left out entirely. `span`: the
    round of the run this is, for `train.lr_schedule = "whole_run"` (`optimise`).
    """
    row_weights = None
    if weights is not None:
        if len(weights) != len(examples):
            raise TrainingError(f"{len(weights)} weights for {len(examples)} examples")
        if not all(np.isfinite(w) and w >= 0 for w in weights):
            raise TrainingError("example weights must be finite and >= 0")
        kept = [i for i, w in enumerate(weights) if w > 0]
        examples = [examples[i] for i in kept]
        row_weights = torch.tensor(
            [float(weights[i]) for i in kept], dtype=torch.float32, device=model_device(model)
        )
    if not examples:
        raise TrainingError(
            "no training examples" + (" with a positive weight" if weights is not None else "")
        )

    device = model_device(model)

    def loss_of(index: list[int]) -> tuple[torch.Tensor]:
        batch = collate([examples[i] for i in index], pad_id, device=device)
        logits = target_logits(model, batch)
        if row_weights is None:
            return (answer_cross_entropy(logits, batch),)
        return (weighted_answer_cross_entropy(logits, batch, row_weights[index]),)

    epochs = cfg.epochs if epochs is None else epochs
    steps, means = optimise(
        [(model, lr)], len(examples), loss_of, cfg=cfg, epochs=epochs, seed=seed, on_step=on_step, span=span
    )
    return TrainResult(steps=steps, mean_loss=float(means[0]), num_examples=len(examples))
