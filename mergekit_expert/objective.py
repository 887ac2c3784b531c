"""Loss terms of the alignment objective (METHOD.md, stage 1)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    return values[mask].mean()


def logit_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), mean over aligned positions.

    Logits are [T, V]; the mask selects positions (None: all). With ``indices``
    [T, k] the teacher gave only its top-k logits [T, k]: both distributions
    are renormalized over those k tokens (k = V gives the full loss).
    """
    if indices is not None:
        student_logits = student_logits.gather(-1, indices)
    teacher = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    per_position = (teacher.exp() * (teacher - student)).sum(-1)
    return temperature**2 * _masked_mean(per_position, mask)


def hidden_loss(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Element-mean squared error of hidden states [T, D], averaged over the layers."""
    terms = []
    for student, teacher in zip(student_hidden, teacher_hidden, strict=True):
        error = (student.float() - teacher.float()).pow(2)
        terms.append(error.mean() if mask is None else error[mask].mean())
    return torch.stack(terms).mean()


def regularizer(
    alphas: Mapping[str, torch.Tensor], targets: Sequence[float]
) -> torch.Tensor:
    """R = sum_k sum_slots |alpha - init_k| / (coefficient slots per expert).

    ``alphas`` maps each weight to its [K, m] coefficients; ``targets`` holds
    each expert's initial alpha.
    """
    matrices = list(alphas.values())
    slots = sum(m.shape[1] for m in matrices)
    target = torch.tensor(targets, dtype=matrices[0].dtype, device=matrices[0].device)
    total = sum((m - target[:, None]).abs().sum() for m in matrices)
    return total / slots
