"""FedCoLLM's server step (Eq. 4-6): mutual distillation between the LLM and the aggregated SLM.

Each batch runs one forward of each model on the same auxiliary texts; each model's logits are
its own student output and, detached, the other's teacher -- where that forward runs no dropout.
A model whose training forward drops activations (LoRA dropout, GPT-2's or OPT's base dropout)
teaches from a second, no-grad forward in eval mode, as the reference computes teacher logits:
noisy targets would otherwise change from one use of the same text to the next. Where the two models tokenise
differently, each teacher's top-K distribution is carried onto the student's answer tokens by a
`TokenBridge` (MinED vocabulary map, DTW sequence alignment).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from peft import PeftModel

from fedcollm.align.bridge import TokenBridge
from fedcollm.config import DistillConfig, TrainConfig
from fedcollm.errors import FedcollmError
from fedcollm.lm.devices import from_numpy, model_device, to_numpy
from fedcollm.lm.dropout import teacher_logits
from fedcollm.lm.encoding import Encoded, collate
from fedcollm.lm.logits import answer_cross_entropy, target_logits
from fedcollm.protocol import StepCallback
from fedcollm.training.kd import KdDirection, kd_loss, kd_loss_sparse
from fedcollm.training.optimise import ONE_ROUND, ScheduleSpan, optimise


class TokenizerMismatchError(FedcollmError, ValueError):
    """The two models tokenise differently, so their logits cannot be compared position by position."""


def aligned_teacher(
    teacher_logits: torch.Tensor,
    teacher_items: Sequence[Encoded],
    student_items: Sequence[Encoded],
    bridge: TokenBridge,
    top_k: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-K rows over its answer tokens, carried onto the student's answer tokens.

    `teacher_logits` are row-major over `teacher_items` (as `target_logits` returns them).
    Returns student-vocabulary ids [P_s, K] (-1 padding) and logits [P_s, K], detached, on
    `device` (the student's). The mapping runs on the host: only the top-K rows cross.
    """
    k = min(top_k, teacher_logits.shape[-1])
    values, ids = teacher_logits.detach().float().topk(k, dim=-1)
    values_np, ids_np = to_numpy(values), to_numpy(ids)
    out_ids, out_vals = [], []
    offset = 0
    for t_item, s_item in zip(teacher_items, student_items, strict=True):
        n = t_item.n_target
        mapped_ids, mapped_vals = bridge.transfer(
            t_item.answer_ids, s_item.answer_ids, ids_np[offset : offset + n], values_np[offset : offset + n]
        )
        out_ids.append(mapped_ids)
        out_vals.append(mapped_vals)
        offset += n
    return (
        from_numpy(np.concatenate(out_ids).astype(np.int64), device),
        from_numpy(np.concatenate(out_vals).astype(np.float32), device),
    )


def distill_losses(
    llm: PeftModel,
    slm: PeftModel,
    llm_items: Sequence[Encoded],
    slm_items: Sequence[Encoded],
    *,
    llm_pad_id: int,
    slm_pad_id: int,
    cfg: DistillConfig,
    direction: KdDirection = "forward",
    bridges: tuple[TokenBridge, TokenBridge] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of Eq. 4-6 from one forward of each model: (L_f, L_g, KD term of f, KD term of g).

    Each model's logits are its student output and, detached, the other's teacher (from a
    separate eval-mode forward where the training one runs dropout: `lm.dropout.teacher_logits`),
    so backpropagating L_f + L_g reaches each adapter only through its own loss.
    """
    f_device, g_device = model_device(llm), model_device(slm)
    batch_f = collate(list(llm_items), llm_pad_id, device=f_device)
    batch_g = collate(list(slm_items), slm_pad_id, device=g_device)
    f_logits = target_logits(llm, batch_f)
    g_logits = target_logits(slm, batch_g)
    f_teacher = teacher_logits(llm, batch_f, f_logits)
    g_teacher = teacher_logits(slm, batch_g, g_logits)
    if bridges is None:
        # The same answer ids, position by position (torch.equal is False for other lengths too).
        if not torch.equal(batch_f.targets, batch_g.targets.to(f_device)):
            raise TokenizerMismatchError(
                "the two models split the answers into different tokens, so their logits cannot "
                "be compared position by position; token alignment is needed (pass bridges)"
            )
        vocab = min(f_logits.shape[-1], g_logits.shape[-1])  # embedding rows past the tokenizer
        kd_args = (cfg.temperature, direction, cfg.kd_reduction)
        # Each teacher's rows go to its student's device (the LLM and SLM may sit apart).
        kd_f = kd_loss(f_logits[:, :vocab], g_teacher[:, :vocab].to(f_device), *kd_args)
        kd_g = kd_loss(g_logits[:, :vocab], f_teacher[:, :vocab].to(g_device), *kd_args)
    else:
        g_ids, g_vals = aligned_teacher(f_teacher, llm_items, slm_items, bridges[0], cfg.top_k, g_device)
        f_ids, f_vals = aligned_teacher(g_teacher, slm_items, llm_items, bridges[1], cfg.top_k, f_device)
        kd_f = kd_loss_sparse(f_logits, f_ids, f_vals, cfg.temperature, cfg.kd_reduction)
        kd_g = kd_loss_sparse(g_logits, g_ids, g_vals, cfg.temperature, cfg.kd_reduction)
    loss_f = answer_cross_entropy(f_logits, batch_f) + cfg.kd_weight * kd_f
    loss_g = answer_cross_entropy(g_logits, batch_g) + cfg.kd_weight * kd_g
    return loss_f, loss_g, kd_f, kd_g


@dataclass(frozen=True)
class DistillResult:
    steps: int
    llm_loss: float
    slm_loss: float
    llm_kd: float
    slm_kd: float


def mutual_distill(
    llm: PeftModel,
    slm: PeftModel,
    llm_examples: Sequence[Encoded],
    slm_examples: Sequence[Encoded],
    *,
    llm_pad_id: int,
    slm_pad_id: int,
    llm_lr: float,
    slm_lr: float,
    cfg: DistillConfig,
    train_cfg: TrainConfig,
    seed: int,
    direction: KdDirection = "forward",
    bridges: tuple[TokenBridge, TokenBridge] | None = None,
    on_step: StepCallback | None = None,
    span: ScheduleSpan = ONE_ROUND,
) -> DistillResult:
    """FedCoLLM's server step (Eq. 4-6): R epochs of joint updates on the auxiliary set.

    Per batch each model runs one forward: its logits are the student output for its own loss
    and, detached, the teacher for the other model (a model with active dropout adds one no-grad
    eval-mode forward for its teacher logits). L_f = CE(f) + lambda*KL(g||f) trains the
    LLM adapter and L_g = CE(g) + lambda*KL(f||g) the SLM adapter, each with its own optimiser.
    `llm_examples[i]` and `slm_examples[i]` are the same text in each model's tokenisation.
    Without `bridges` both must tokenise it alike and the KL is exact over the shared vocabulary;
    with `bridges` (LLM->SLM, SLM->LLM) each teacher's top-`cfg.top_k` distribution is carried
    onto the student's tokens by MinED alignment, and the KL is taken against that. `span`: the
    round of the run this is, for `train.lr_schedule = "whole_run"` (both models' schedules).
    """
    if len(llm_examples) != len(slm_examples) or not llm_examples:
        raise ValueError("distillation needs the same non-empty example list for both models")

    def loss_of(index: list[int]) -> tuple[torch.Tensor, ...]:
        loss_f, loss_g, kd_f, kd_g = distill_losses(
            llm,
            slm,
            [llm_examples[i] for i in index],
            [slm_examples[i] for i in index],
            llm_pad_id=llm_pad_id,
            slm_pad_id=slm_pad_id,
            cfg=cfg,
            direction=direction,
            bridges=bridges,
        )
        return loss_f + loss_g, loss_f, loss_g, kd_f, kd_g  # one backward reaches both adapters

    step_cfg = train_cfg.model_copy(update={"batch_size": cfg.batch_size})
    steps, means = optimise(
        [(llm, llm_lr), (slm, slm_lr)],
        len(llm_examples),
        loss_of,
        cfg=step_cfg,
        epochs=cfg.epochs,
        seed=seed,
        on_step=on_step,
        span=span,
    )
    return DistillResult(steps, *(float(x) for x in means[1:]))
