"""Supervised LoRA fine-tuning with the loss on answer tokens only.

Used by every algorithm that trains on labelled data: clients' local updates, Standalone,
FedAvg, and the Centralized baseline. The base model is frozen; only adapter parameters train.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel

from fedcollm.config import TrainConfig
from fedcollm.lm.encoding import Batch, Encoded, batches, collate
from fedcollm.lm.logits import answer_cross_entropy, target_logits

StepCallback = Callable[[int, int, float], None]
"""Called after each optimiser step with (step, total_steps, loss)."""


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (was a LoRA adapter attached?)")
    return params


def make_optimizer(
    model: torch.nn.Module, lr: float, cfg: TrainConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the adapter with linear warmup then linear decay to zero."""
    optimizer = torch.optim.AdamW(
        trainable_parameters(model), lr=lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay
    )
    warmup = round(cfg.warmup_ratio * total_steps)

    def schedule(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


@dataclass(frozen=True)
class TrainResult:
    steps: int
    mean_loss: float
    num_examples: int


def epoch_orders(n: int, epochs: int, seed: int) -> list[list[int]]:
    """A seeded shuffle of `range(n)` per epoch."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(n).tolist() for _ in range(epochs)]


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
    per_row = torch.zeros(size, dtype=token_ce.dtype).index_add(0, rows, token_ce)
    counts = torch.zeros(size, dtype=token_ce.dtype).index_add(0, rows, torch.ones_like(token_ce))
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
) -> TrainResult:
    """Fine-tune the model's adapter on `examples` for `epochs` (default `cfg.epochs`).

    `weights` (one per example, >= 0) turns the loss into a weighted likelihood
    (`weighted_answer_cross_entropy`); examples of weight 0 are left out entirely.
    """
    row_weights = None
    if weights is not None:
        if len(weights) != len(examples):
            raise ValueError(f"{len(weights)} weights for {len(examples)} examples")
        if not all(np.isfinite(w) and w >= 0 for w in weights):
            raise ValueError("example weights must be finite and >= 0")
        kept = [i for i, w in enumerate(weights) if w > 0]
        examples = [examples[i] for i in kept]
        row_weights = torch.tensor([float(weights[i]) for i in kept], dtype=torch.float32)
    if not examples:
        raise ValueError("no training examples" + (" with a positive weight" if weights is not None else ""))

    def loss_of(index: list[int]) -> tuple[torch.Tensor]:
        batch = collate([examples[i] for i in index], pad_id)
        logits = target_logits(model, batch)
        if row_weights is None:
            return (answer_cross_entropy(logits, batch),)
        return (weighted_answer_cross_entropy(logits, batch, row_weights[index]),)

    epochs = cfg.epochs if epochs is None else epochs
    steps, means = optimise(
        [(model, lr)], len(examples), loss_of, cfg=cfg, epochs=epochs, seed=seed, on_step=on_step
    )
    return TrainResult(steps=steps, mean_loss=float(means[0]), num_examples=len(examples))


def optimise(
    models: Sequence[tuple[PeftModel, float]],
    num_examples: int,
    loss_of: Callable[[list[int]], Sequence[torch.Tensor]],
    *,
    cfg: TrainConfig,
    epochs: int,
    seed: int,
    on_step: StepCallback | None = None,
) -> tuple[int, np.ndarray]:
    """The adapter-training loop every trainer shares; returns the step count and each term's mean.

    SFT, FedMKT's knowledge training and FedCoLLM's mutual distillation all run it: seeded epoch
    orders, batches of `cfg.batch_size`, one backward per batch of the loss `loss_of(index)`
    gives first (any further terms are only reported), then for each (model, learning rate) in
    `models` its own gradient clipping, AdamW step and warmup/linear-decay schedule.
    """
    orders = epoch_orders(num_examples, epochs, seed)
    total = -(-num_examples // cfg.batch_size) * epochs
    stepped = [(model, *make_optimizer(model, lr, cfg, total)) for model, lr in models]
    torch.manual_seed(seed)
    for model, _ in models:
        model.train()
    history: list[list[float]] = []
    for order in orders:
        for index in batches(range(num_examples), cfg.batch_size, order):
            terms = loss_of(index)
            terms[0].backward()
            for model, optimizer, scheduler in stepped:
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trainable_parameters(model), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            history.append([float(t.detach()) for t in terms])
            if on_step is not None:
                on_step(len(history), total, history[-1][0])
    for model, _ in models:
        model.eval()
    return len(history), np.mean(history, axis=0) if history else np.zeros(1)
