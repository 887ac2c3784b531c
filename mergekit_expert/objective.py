"""The alignment objective: its loss terms and the objective over the cached samples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch

from .distributed import all_reduce_sum

if TYPE_CHECKING:
    from .config import CalibrationConfig
    from .student import Student
    from .teacher import TeacherCache


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
    alphas: Mapping[str, torch.Tensor],
    targets: Sequence[float],
    shares: Mapping[str, torch.Tensor] | None = None,
    fixed: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """R = (1/L) sum_k sum_l sum_s share(l, s) * |alpha[k, l, s] - init_k|.

    ``alphas`` maps each weight to its [K, m] coefficients and ``targets``
    holds each expert's initial alpha. share(l, s) is chunk s's fraction of
    weight l's elements (``shares[name]``, [m]; 1/m each when not given), so R
    does not change when a weight is split into chunks with equal values: a
    warm-started stage 2 starts at stage 1's objective. ``fixed`` weights
    ([K, 1], untrained) count as constants; L counts every weight. With one
    coefficient per weight this is the paper's R (release normalization).
    """
    matrices = list(alphas.values()) or list((fixed or {}).values())
    target = torch.tensor(targets, dtype=matrices[0].dtype, device=matrices[0].device)
    terms = []
    for name, matrix in alphas.items():
        share = shares[name] if shares is not None else None
        if share is None:
            share = torch.full((matrix.shape[1],), 1.0 / matrix.shape[1])
        share = share.to(matrix)
        terms.append(((matrix - target[:, None]).abs() * share).sum())
    for matrix in (fixed or {}).values():
        terms.append((matrix.to(target) - target[:, None]).abs().sum())
    total = cast(torch.Tensor, sum(terms))
    return total / (len(alphas) + len(fixed or {}))


@dataclass(frozen=True)
class Objective:
    """The calibration objective of both stages over the cached samples.

    ``sum_k beta_k / s_k * mean_i L_i`` over each expert k's samples i, with
    ``L = logit_weight * L_logit + hidden_weight * L_hid`` against the sample's
    own expert, plus ``reg_weight * R``. ``hidden_layers`` is empty when the
    hidden term is off. ``scales`` s_k: 1 (``alignment_scale: absolute``, the
    paper's), or expert k's loss at the base model (``base``), so each term
    is the fraction of the expert's distance from the base still left and
    ``reg_weight`` means the same on any model, vocabulary or data.
    """

    cache: TeacherCache
    task_weights: tuple[float, ...]
    scales: tuple[float, ...] = ()
    hidden_layers: tuple[int, ...] = ()
    logit_weight: float = 1.0
    hidden_weight: float = 1.0
    temperature: float = 1.0
    align: str = "all"
    reg_weight: float = 0.8

    @classmethod
    def from_config(
        cls,
        cache: TeacherCache,
        config: CalibrationConfig,
        hidden_layers: Sequence[int],
        task_weights: Sequence[float],
    ) -> Objective:
        return cls(
            cache=cache,
            task_weights=tuple(task_weights),
            hidden_layers=tuple(hidden_layers) if config.hidden_weight > 0 else (),
            logit_weight=config.logit_weight,
            hidden_weight=config.hidden_weight,
            temperature=config.temperature,
            align=config.align,
            # auto: chosen later (selection.py); no stage runs before that
            reg_weight=0.0 if config.reg_weight == "auto" else config.reg_weight,
        )

    @property
    def experts(self) -> int:
        return len(self.task_weights)

    @property
    def weights(self) -> tuple[float, ...]:
        """beta_k / s_k: what expert k's mean loss is multiplied by."""
        scales = self.scales or (1.0,) * self.experts
        return tuple(b / s for b, s in zip(self.task_weights, scales))

    def sample_terms(
        self, student: Student, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_l * L_logit, w_h * L_hid) of one sample against its own expert
        (a term that is off is 0 and costs nothing)."""
        sample = self.cache.samples[index]
        target = self.cache.target(index)
        mask = sample.align_mask(self.align)
        logits, hidden = student.forward(
            sample.input_ids, self.hidden_layers, sample.extra_inputs()
        )
        device = logits.device
        if mask is not None:
            mask = mask.to(device)
        logit_term = hidden_term = logits.new_zeros(())
        if self.logit_weight > 0:
            indices = target.indices.to(device) if target.indices is not None else None
            logit_term = self.logit_weight * logit_loss(
                logits, target.logits.to(device), self.temperature, mask, indices
            )
        if self.hidden_layers:
            hidden_term = self.hidden_weight * hidden_loss(
                hidden, [h.to(device) for h in target.hidden], mask
            )
        return logit_term, hidden_term

    def sample_loss(self, student: Student, index: int) -> torch.Tensor:
        """L_logit + w_h * L_hid of one sample against its own expert."""
        logit_term, hidden_term = self.sample_terms(student, index)
        return logit_term + hidden_term

    @torch.no_grad()
    def sample_losses(self, student: Student) -> torch.Tensor:
        """Every cached sample's loss L_i by global index (0 for samples not in
        this cache), gathered from all ranks."""
        losses = torch.zeros(len(self.cache.experts), dtype=torch.float64)
        for index in sorted(self.cache.samples):
            losses[index] = float(self.sample_loss(student, index))
        (losses,) = all_reduce_sum([losses])  # this rank's samples -> all
        return losses

    def shares(self, losses: torch.Tensor) -> torch.Tensor:
        """Each sample's part of ``alignment``: beta_k / s_k * L_i / n_k."""
        experts = torch.tensor(self.cache.experts)
        out = torch.zeros_like(losses)
        for k, weight in enumerate(self.weights):
            mine = experts == k
            if mine.any():
                out[mine] = weight * losses[mine] / int(mine.sum())
        return out

    @torch.no_grad()
    def alignment(self, student: Student) -> tuple[float, list[float]]:
        """sum_k beta_k * mean loss of expert k's samples, at the loaded weights."""
        means = self.expert_means(self.sample_losses(student))
        return sum(b * m for b, m in zip(self.weights, means)), means

    def expert_means(self, values: torch.Tensor) -> list[float]:
        """Each expert's mean of per-sample ``values`` (by global index; 0 for
        an expert without samples)."""
        experts = torch.tensor(self.cache.experts)
        return [
            float(values[experts == k].mean()) if (experts == k).any() else 0.0
            for k in range(self.experts)
        ]

    @torch.no_grad()
    def term_means(self, student: Student) -> dict[str, list[float]]:
        """Each expert's mean weighted logit and hidden term at the loaded
        coefficients (they add up to its alignment loss, before beta_k / s_k):
        which of the two the objective mostly serves."""
        terms = torch.zeros(2, len(self.cache.experts), dtype=torch.float64)
        for index in sorted(self.cache.samples):
            logit_term, hidden_term = self.sample_terms(student, index)
            terms[0, index], terms[1, index] = float(logit_term), float(hidden_term)
        (terms,) = all_reduce_sum([terms])
        return {
            "logit": self.expert_means(terms[0]),
            "hidden": self.expert_means(terms[1]),
        }

    def measure(self, student: Student) -> tuple[float, float]:
        """(alignment loss, objective) at the loaded coefficients, over every sample."""
        aligned, _ = self.alignment(student)
        reg = 0.0
        if student.raw or student.fixed:
            reg = float(student.regularizer().detach())
        return aligned, aligned + self.reg_weight * reg
