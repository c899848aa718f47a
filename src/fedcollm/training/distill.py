"""Knowledge distillation between two language models: KL losses and FedCoLLM's mutual step.

Convention: `kd_loss(student, teacher)` is KL(p_teacher || p_student), Hinton's distillation
loss, which is what the paper's l_KL(student(x), teacher(x)) denotes in the argument order of
`torch.nn.functional.kl_div(input=student, target=teacher)`. The teacher side never receives a
gradient. `direction="reverse"` gives KL(p_student || p_teacher) for users who want it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from peft import PeftModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from fedcollm.align.bridge import TokenBridge
from fedcollm.config import DistillConfig, TrainConfig
from fedcollm.lm.encoding import Encoded, collate
from fedcollm.lm.logits import answer_cross_entropy, target_logits
from fedcollm.training.sft import optimise

KdDirection = Literal["forward", "reverse"]


class TokenizerMismatchError(ValueError):
    """The two models tokenise differently, so their logits cannot be compared position by position."""


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    direction: KdDirection = "forward",
) -> torch.Tensor:
    """Mean over positions of KL between softened distributions, scaled by T^2 (Hinton et al.).

    Both inputs are [P, V] over the same vocabulary. The teacher is detached here, so a caller
    cannot accidentally train the teacher through this term.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logit shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    t = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1) if direction == "forward" else (s.exp() * (s - t)).sum(-1)
    return kl.mean() * temperature**2


def kd_loss_sparse(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(p_teacher || p_student) where the teacher is a top-K distribution in the student's vocabulary.

    `student_logits` [P, V]; `teacher_ids` [P, K] student-vocabulary ids (-1 = padding) and
    `teacher_values` [P, K] their logits (padding ignored). The teacher distribution is the
    softmax of its K logits (what survives of it after top-K and token alignment); the student
    keeps its full softmax. A one-hot teacher row (one valid entry) reduces to cross-entropy.
    Every row must hold at least one valid entry.
    """
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    valid = teacher_ids >= 0
    if not bool(valid.any(dim=1).all()):
        raise ValueError("a teacher row has no valid entry (empty distribution)")
    t_logits = teacher_values.detach().float().masked_fill(~valid, float("-inf")) / temperature
    t_logp = torch.log_softmax(t_logits, dim=-1)
    s_logp = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    s_logp = s_logp.gather(1, teacher_ids.clamp(min=0))
    terms = torch.where(valid, t_logp.exp() * (t_logp - s_logp), torch.zeros_like(s_logp))
    return terms.sum(-1).mean() * temperature**2


def same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers split every text alike (same vocabulary), so logits compare directly."""
    return a is b or a.get_vocab() == b.get_vocab()


def aligned_teacher(
    teacher_logits: torch.Tensor,
    teacher_items: Sequence[Encoded],
    student_items: Sequence[Encoded],
    bridge: TokenBridge,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-K rows over its answer tokens, carried onto the student's answer tokens.

    `teacher_logits` are row-major over `teacher_items` (as `target_logits` returns them).
    Returns student-vocabulary ids [P_s, K] (-1 padding) and logits [P_s, K], detached.
    """
    k = min(top_k, teacher_logits.shape[-1])
    values, ids = teacher_logits.detach().float().topk(k, dim=-1)
    values_np, ids_np = values.numpy(), ids.numpy()
    out_ids, out_vals = [], []
    offset = 0
    for t_item, s_item in zip(teacher_items, student_items, strict=True):
        n = t_item.n_target
        mapped_ids, mapped_vals = bridge.transfer(
            t_item, s_item, ids_np[offset : offset + n], values_np[offset : offset + n]
        )
        out_ids.append(mapped_ids)
        out_vals.append(mapped_vals)
        offset += n
    return (
        torch.from_numpy(np.concatenate(out_ids).astype(np.int64)),
        torch.from_numpy(np.concatenate(out_vals).astype(np.float32)),
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

    Each model's logits are its student output and, detached inside the KD loss, the other's
    teacher, so backpropagating L_f + L_g reaches each adapter only through its own loss.
    """
    batch_f = collate(list(llm_items), llm_pad_id)
    batch_g = collate(list(slm_items), slm_pad_id)
    f_logits = target_logits(llm, batch_f)
    g_logits = target_logits(slm, batch_g)
    if bridges is None:
        if batch_f.num_targets != batch_g.num_targets:
            raise TokenizerMismatchError(
                "the two models split the answers into different tokens, so their logits cannot "
                "be compared position by position; token alignment is needed (pass bridges)"
            )
        vocab = min(f_logits.shape[-1], g_logits.shape[-1])  # embedding rows past the tokenizer
        kd_f = kd_loss(f_logits[:, :vocab], g_logits[:, :vocab], cfg.temperature, direction)
        kd_g = kd_loss(g_logits[:, :vocab], f_logits[:, :vocab], cfg.temperature, direction)
    else:
        g_ids, g_vals = aligned_teacher(f_logits, llm_items, slm_items, bridges[0], cfg.top_k)
        f_ids, f_vals = aligned_teacher(g_logits, slm_items, llm_items, bridges[1], cfg.top_k)
        kd_f = kd_loss_sparse(f_logits, f_ids, f_vals, cfg.temperature)
        kd_g = kd_loss_sparse(g_logits, g_ids, g_vals, cfg.temperature)
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
    on_step: Callable[[int, int, float], None] | None = None,
) -> DistillResult:
    """FedCoLLM's server step (Eq. 4-6): R epochs of joint updates on the auxiliary set.

    Per batch each model runs one forward: its logits are the student output for its own loss
    and, detached, the teacher for the other model. L_f = CE(f) + lambda*KL(g||f) trains the
    LLM adapter and L_g = CE(g) + lambda*KL(f||g) the SLM adapter, each with its own optimiser.
    `llm_examples[i]` and `slm_examples[i]` are the same text in each model's tokenisation.
    Without `bridges` both must tokenise it alike and the KL is exact over the shared vocabulary;
    with `bridges` (LLM->SLM, SLM->LLM) each teacher's top-`cfg.top_k` distribution is carried
    onto the student's tokens by MinED alignment, and the KL is taken against that.
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
    )
    return DistillResult(steps, *(float(x) for x in means[1:]))
