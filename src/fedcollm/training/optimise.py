"""The adapter-training loop every trainer shares: seeded epochs, batches, AdamW per adapter.

Supervised fine-tuning (`fedcollm.training.sft`), FedMKT's knowledge training and FedCoLLM's
mutual distillation all run `optimise`; they differ only in the loss of a batch. The base models
are frozen; only adapter parameters train, each model with its own optimiser and schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from peft import PeftModel

from fedcollm.config import TrainConfig
from fedcollm.lm.devices import model_device
from fedcollm.lm.encoding import batches
from fedcollm.lm.precision import compute_dtype, needs_loss_scaling
from fedcollm.protocol import StepCallback


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (was a LoRA adapter attached?)")
    return params


@dataclass(frozen=True)
class ScheduleSpan:
    """Where one call of `optimise` sits in the run: round `round` of the `rounds` its phase recurs in.

    Only `train.lr_schedule = "whole_run"` reads it: one warmup/linear-decay schedule then spans
    all `rounds` calls, call `round` taking its steps (round-1)*n .. round*n-1 of rounds*n, for
    its n steps. "per_round" gives every call a schedule of its own, as does the default span,
    round 1 of 1.
    """

    round: int = 1
    rounds: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.round <= self.rounds:
            raise ValueError(f"schedule span: round {self.round} of {self.rounds}, outside 1..{self.rounds}")


ONE_ROUND = ScheduleSpan()
"""A span of one round: the schedule is this call's own under either `train.lr_schedule`."""


def make_optimizer(
    model: torch.nn.Module, lr: float, cfg: TrainConfig, total_steps: int, span: ScheduleSpan = ONE_ROUND
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the adapter with linear warmup then linear decay to zero.

    The schedule spans these `total_steps` (`train.lr_schedule = "per_round"`), or, with
    "whole_run", `span.rounds` calls of as many steps, of which this is call `span.round`: its
    steps continue where the previous round's ended. The optimiser's state is new either way.
    """
    optimizer = torch.optim.AdamW(
        trainable_parameters(model), lr=lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay
    )
    rounds, offset = 1, 0
    if cfg.lr_schedule == "whole_run":
        rounds, offset = span.rounds, (span.round - 1) * total_steps
    total = rounds * total_steps
    warmup = round(cfg.warmup_ratio * total)

    def schedule(step: int) -> float:
        step += offset
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def epoch_orders(n: int, epochs: int, seed: int) -> list[list[int]]:
    """A seeded shuffle of `range(n)` per epoch."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(n).tolist() for _ in range(epochs)]


def optimise(
    models: Sequence[tuple[PeftModel, float]],
    num_examples: int,
    loss_of: Callable[[list[int]], Sequence[torch.Tensor]],
    *,
    cfg: TrainConfig,
    epochs: int,
    seed: int,
    on_step: StepCallback | None = None,
    span: ScheduleSpan = ONE_ROUND,
) -> tuple[int, np.ndarray]:
    """The adapter-training loop every trainer shares; returns the step count and each term's mean.

    SFT, FedMKT's knowledge training and FedCoLLM's mutual distillation all run it: seeded epoch
    orders, batches of `cfg.batch_size`, one backward per batch of the loss `loss_of(index)`
    gives first (any further terms are only reported), then for each (model, learning rate) in
    `models` its own gradient clipping, AdamW step and warmup/linear-decay schedule (this call's
    own, or with `train.lr_schedule = "whole_run"` its part `span` of one over all rounds).
    """
    orders = epoch_orders(num_examples, epochs, seed)
    total = -(-num_examples // cfg.batch_size) * epochs
    stepped = [(model, *make_optimizer(model, lr, cfg, total, span)) for model, lr in models]
    scaler = loss_scaler([model for model, _ in models])
    torch.manual_seed(seed)
    for model, _ in models:
        model.train()
        if cfg.gradient_checkpointing:
            _checkpointing(model, True)
    history: list[list[float]] = []
    try:
        for order in orders:
            for index in batches(range(num_examples), cfg.batch_size, order):
                terms = _accumulated_terms(index, loss_of, cfg.grad_accum_steps, scaler)
                for model, optimizer, scheduler in stepped:
                    if scaler is not None:
                        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(trainable_parameters(model), cfg.grad_clip)
                    if scaler is not None:
                        scaler.step(optimizer)  # skipped where a gradient overflowed
                    else:
                        optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.update()
                history.append(terms)
                if on_step is not None:
                    on_step(len(history), total, history[-1][0])
    finally:
        for model, _ in models:
            if cfg.gradient_checkpointing:
                _checkpointing(model, False)
            model.eval()
    return len(history), np.mean(history, axis=0) if history else np.zeros(1)


def loss_scaler(models: Sequence[PeftModel]) -> torch.amp.GradScaler | None:
    """torch's dynamic loss scaler where a base model computes in float16, else None.

    Gradients flowing back through float16 base layers underflow below 6e-8; the scaler
    multiplies the loss before backward, divides the adapter gradients (float32) back before
    clipping and the AdamW step, and skips a step whose gradients overflowed.
    """
    if not any(needs_loss_scaling(compute_dtype(model.get_base_model())) for model in models):
        return None
    return torch.amp.GradScaler(model_device(models[0]).type)


def _checkpointing(model: PeftModel, on: bool) -> None:
    """transformers' activation (gradient) checkpointing on the base model, non-reentrant (so the
    frozen base needs no input gradients for the LoRA parameters to get theirs)."""
    # peft types the base model as a plain Module; the methods are transformers'.
    base: Any = model.get_base_model()
    if on:
        base.activation_checkpointing_enable({"use_reentrant": False})
    else:
        base.activation_checkpointing_disable()


def _accumulated_terms(
    index: list[int],
    loss_of: Callable[[list[int]], Sequence[torch.Tensor]],
    micro_batches: int,
    scaler: torch.amp.GradScaler | None = None,
) -> list[float]:
    """Backward of one batch's loss, in `micro_batches` pieces (`train.grad_accum_steps`), scaled
    by `scaler` if given; the batch's loss terms, each micro-batch's weighted by its share of the
    examples."""
    pieces = np.array_split(np.asarray(index), min(micro_batches, len(index)))
    batch_terms: list[float] = []
    for piece in pieces:
        share = len(piece) / len(index)
        terms = loss_of([int(i) for i in piece])
        loss = terms[0] * share
        (scaler.scale(loss) if scaler is not None else loss).backward()
        values = [float(t.detach()) * share for t in terms]
        batch_terms = values if not batch_terms else [a + b for a, b in zip(batch_terms, values, strict=True)]
    return batch_terms
