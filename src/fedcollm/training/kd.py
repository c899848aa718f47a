"""Knowledge-distillation losses between a student's logits and a teacher's, over one vocabulary.

Convention: `kd_loss(student, teacher)` is KL(p_teacher || p_student), Hinton's distillation
loss, which is what the FedCoLLM paper's l_KL(student(x), teacher(x)) denotes in the argument
order of `torch.nn.functional.kl_div(input=student, target=teacher)`. The teacher side never
receives a gradient. `direction="reverse"` gives KL(p_student || p_teacher) for users who want it.
FedCoLLM's mutual distillation and FedMKT's knowledge training both use these.
"""

from __future__ import annotations

from typing import Literal

import torch

KdDirection = Literal["forward", "reverse"]
KdReduction = Literal["mean", "sum"]
"""How per-position KL terms become one loss: `"mean"` over positions times T^2 (Hinton et al.;
the KD-to-CE balance does not depend on how many answer tokens a batch has), or `"sum"` over
positions without T^2 (FATE-LLM's FedCoLLM reference, `computing_kd_loss(...).sum()`)."""


def _reduce(kl: torch.Tensor, temperature: float, reduction: KdReduction) -> torch.Tensor:
    if reduction == "sum":
        return kl.sum()
    return kl.mean() * temperature**2


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    direction: KdDirection = "forward",
    reduction: KdReduction = "mean",
) -> torch.Tensor:
    """KL between softened distributions per position, reduced by `reduction` (`KdReduction`).

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
    return _reduce(kl, temperature, reduction)


def kd_loss_sparse(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_values: torch.Tensor,
    temperature: float = 1.0,
    reduction: KdReduction = "mean",
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
    return _reduce(terms.sum(-1), temperature, reduction)
