"""Distillation losses and the frozen teacher used by quantization-aware distillation (QAD).

The QAD recipe (NVIDIA's QAD report, arXiv 2601.20088): the loss is KL(p_teacher ‖ p_student) on
the logits at temperature 1, the teacher is the original full-precision model; feature losses
(MSE between named intermediate tensors) are optional extras. :func:`distill_loss` is what the
``insert-distill-taps`` pass puts into the student graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["distill_loss", "kl_divergence", "FrozenTeacher"]


def kl_divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over all positions of KL(p_teacher ‖ p_student) on the last axis, times T².

    The T² factor keeps the gradient scale independent of the temperature (Hinton et al.).
    """
    t = float(temperature)
    log_p_student = torch.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = torch.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)
    return kl.mean() * (t * t)


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_features: list[Tensor],
    teacher_features: list[Tensor],
    temperature: float,
    kl_weight: float,
    feature_weights: list[float],
) -> Tensor:
    """``kl_weight * KL(teacher ‖ student) + Σ w_i * MSE(student_i, teacher_i)``."""
    loss = kl_weight * kl_divergence(student_logits, teacher_logits, temperature)
    for s, t, w in zip(student_features, teacher_features, feature_weights):
        loss = loss + w * torch.nn.functional.mse_loss(s.float(), t.float())
    return loss


class FrozenTeacher(torch.nn.Module):
    """A full-precision model that never trains: eval mode always, no gradients, run under no_grad.

    Args:
        module: the teacher (its parameters are set to ``requires_grad=False``).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "FrozenTeacher":  # noqa: ARG002 - always eval
        return super().train(False)

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        with torch.no_grad():
            return self.module(*args)
