"""Coefficient training: one readable loop (AdamW, cosine schedule, accumulation).

Each optimizer step accumulates weight gradients of ``accumulation`` samples,
projects them onto the task vectors (exact coefficient gradients), adds the
regularizer's gradient and steps the raw coefficients; the student then reloads
its merged weights from the new coefficients.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .config import CalibrationConfig
from .data import epoch_order
from .objective import hidden_loss, logit_loss, regularizer
from .student import Student
from .teacher import TeacherCache


@dataclass
class TrainHistory:
    epoch_loss: list[float] = field(default_factory=list)  # full objective
    epoch_expert_loss: list[list[float]] = field(default_factory=list)  # per expert
    # Calibration alignment loss at the start and after each epoch; the
    # coefficients with the lowest one are kept (a warm start stays feasible).
    alignment: list[float] = field(default_factory=list)
    best_epoch: int = 0  # 0 = the starting coefficients
    steps: int = 0
    stopped_early: bool = False

    @property
    def best_alignment(self) -> float:
        return self.alignment[self.best_epoch]


def sample_loss(
    student: Student,
    cache: TeacherCache,
    index: int,
    config: CalibrationConfig,
    hidden_layers: Sequence[int],
) -> torch.Tensor:
    """L_logit + w_h * L_hid of one sample against its own expert."""
    sample = cache.samples[index]
    target = cache.targets[index]
    mask = sample.align_mask(config.align)
    use_hidden = config.hidden_weight > 0 and bool(hidden_layers)
    logits, hidden = student.forward(
        sample.input_ids, hidden_layers if use_hidden else ()
    )
    device = logits.device
    if mask is not None:
        mask = mask.to(device)
    loss = logits.new_zeros(())
    if config.logit_weight > 0:
        loss = loss + config.logit_weight * logit_loss(
            logits, target.logits.to(device), config.temperature, mask
        )
    if use_hidden:
        loss = loss + config.hidden_weight * hidden_loss(
            hidden, [h.to(device) for h in target.hidden], mask
        )
    return loss


@torch.no_grad()
def alignment_loss(
    student: Student,
    cache: TeacherCache,
    config: CalibrationConfig,
    hidden_layers: Sequence[int],
    task_weights: Sequence[float],
) -> tuple[float, list[float]]:
    """sum_k beta_k * mean loss of expert k's samples, at the loaded weights."""
    per_expert: list[list[float]] = [[] for _ in task_weights]
    for index, sample in enumerate(cache.samples):
        per_expert[sample.expert].append(
            float(sample_loss(student, cache, index, config, hidden_layers))
        )
    means = [sum(v) / len(v) if v else 0.0 for v in per_expert]
    return sum(b * m for b, m in zip(task_weights, means)), means


def search_init(
    student: Student,
    cache: TeacherCache,
    config: CalibrationConfig,
    hidden_layers: Sequence[int],
    task_weights: Sequence[float],
    quiet: bool = False,
) -> tuple[float, list[dict]]:
    """The shared alpha of the grid whose task-arithmetic merge aligns best."""
    curve = []
    for value in tqdm(
        config.init_grid, desc="Init search (task arithmetic)", disable=quiet
    ):
        student.set_uniform(value)
        loss, per_expert = alignment_loss(
            student, cache, config, hidden_layers, task_weights
        )
        curve.append({"alpha": value, "loss": loss, "expert_loss": per_expert})
    best = min(curve, key=lambda point: point["loss"])
    return best["alpha"], curve


def make_scheduler(optimizer, config: CalibrationConfig, total_steps: int):
    eta_min = 0.1 * config.lr
    if config.schedule == "cosine_restarts":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer, T_0=50, T_mult=2, eta_min=eta_min
        )
    return torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(total_steps, 1), eta_min=eta_min
    )


def train_coefficients(
    student: Student,
    cache: TeacherCache,
    config: CalibrationConfig,
    hidden_layers: Sequence[int],
    task_weights: Sequence[float],
    *,
    desc: str = "Stage 1",
    quiet: bool = False,
) -> TrainHistory:
    """Train the student's coefficients; returns the loss history."""
    experts = len(task_weights)
    by_expert = [
        [i for i, s in enumerate(cache.samples) if s.expert == k]
        for k in range(experts)
    ]
    rng = random.Random(config.seed)
    steps_per_epoch = math.ceil(len(cache.samples) / config.accumulation)
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = make_scheduler(optimizer, config, steps_per_epoch * config.epochs)
    history = TrainHistory()
    best, stale = math.inf, 0
    student.load()
    history.alignment.append(
        alignment_loss(student, cache, config, hidden_layers, task_weights)[0]
    )
    kept = _snapshot(student)
    if not student.raw:
        return history  # every coefficient is fixed: nothing to train
    progress = tqdm(total=steps_per_epoch * config.epochs, desc=desc, disable=quiet)
    for _epoch in range(config.epochs):
        order = [
            by_expert[k][j] for k, j in epoch_order([len(b) for b in by_expert], rng)
        ]
        epoch_total, expert_sums, expert_counts = 0.0, [0.0] * experts, [0] * experts
        for start in range(0, len(order), config.accumulation):
            batch = order[start : start + config.accumulation]
            student.zero_grad()
            data_loss = 0.0
            for index in batch:
                expert = cache.samples[index].expert
                loss = sample_loss(student, cache, index, config, hidden_layers)
                # K/|batch| turns the sample mean into sum_k beta_k * mean_k.
                (task_weights[expert] * loss * experts / len(batch)).backward()
                data_loss += (
                    task_weights[expert] * float(loss.detach()) * experts / len(batch)
                )
                expert_sums[expert] += float(loss.detach())
                expert_counts[expert] += 1
            grads = student.projected_grads()
            alphas = student.alphas()
            reg = config.reg_weight * regularizer(alphas, student.init)
            surrogate = reg + sum((alphas[n] * grads[n]).sum() for n in alphas)
            surrogate.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            student.load()
            history.steps += 1
            epoch_total += data_loss + float(reg.detach())
            progress.update(1)
            progress.set_postfix(loss=f"{data_loss + float(reg.detach()):.4f}")
        epoch_loss = epoch_total / steps_per_epoch
        history.epoch_loss.append(epoch_loss)
        history.epoch_expert_loss.append(
            [s / max(c, 1) for s, c in zip(expert_sums, expert_counts)]
        )
        aligned, _ = alignment_loss(student, cache, config, hidden_layers, task_weights)
        history.alignment.append(aligned)
        if aligned < history.best_alignment:
            history.best_epoch = len(history.alignment) - 1
            kept = _snapshot(student)
        if epoch_loss < best - 1e-12:
            best, stale = epoch_loss, 0
        else:
            stale += 1
            if stale >= config.patience:
                history.stopped_early = True
                break
    progress.close()
    with torch.no_grad():
        for name, w in student.raw.items():
            w.copy_(kept[name])
    student.load()
    student.zero_grad()
    return history


def _snapshot(student: Student) -> dict[str, torch.Tensor]:
    return {name: w.detach().clone() for name, w in student.raw.items()}
