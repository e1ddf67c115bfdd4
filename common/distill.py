"""Knowledge distillation for multi-label sigmoid outputs: the loss and the teacher's soft targets.

loss = masked BCE(student, labels) + alpha * T^2 * KL(teacher_T || student_T), where p_T =
sigmoid(logit / T) per label and KL is the Bernoulli KL divergence averaged over images and
labels. The soft term covers every label of every image, including labels the image's source
never annotated (NaN), which is where a teacher trained on the fully labelled NIH set adds the
most. T^2 keeps the soft term's gradient on the same scale as the hard term's as T grows
(Hinton et al. 2015). The KL form equals BCE against the teacher minus the teacher's entropy:
the same gradients, but zero when the student matches the teacher, so its value reads directly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """T^2 * mean Bernoulli KL(sigmoid(teacher / T) || sigmoid(student / T)) over images and labels."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ: "
            "the student must have the teacher's labels, in the same order"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    s = student_logits.float() / t
    q = teacher_logits.detach().float() / t
    p_teacher = torch.sigmoid(q)
    cross = F.binary_cross_entropy_with_logits(s, p_teacher, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(q, p_teacher, reduction="none")
    return (cross - entropy).mean() * (t * t)


def distillation_terms(
    hard_loss: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hard_loss + alpha * soft, soft) as tensors: nothing is read back from the device.

    `hard_loss` is the training engine's own masked BCE on the labels (the loss every run uses),
    so a distilled run differs from a normal one only by the soft term.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    soft = soft_target_loss(student_logits, teacher_logits, temperature)
    return hard_loss + float(alpha) * soft, soft


def distillation_loss(
    hard_loss: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """`distillation_terms`, with the parts read back: (loss, {"hard", "soft", "total"} as floats)."""
    total, soft = distillation_terms(hard_loss, student_logits, teacher_logits, temperature, alpha)
    return total, {"hard": float(hard_loss.detach()), "soft": float(soft.detach()), "total": float(total.detach())}
