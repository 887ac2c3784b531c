"""Coefficient training: one readable loop (AdamW, cosine schedule, accumulation).

Each optimizer step accumulates weight gradients of ``accumulation`` samples,
projects them onto the task vectors (exact coefficient gradients), adds the
regularizer's gradient and steps the raw coefficients; the student then reloads
its merged weights from the new coefficients.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .config import CalibrationConfig
from .data import epoch_order
from .distributed import all_reduce_sum
from .errors import ExpertMergingError
from .memory import release_freed_memory
from .objective import Objective
from .student import Student

if TYPE_CHECKING:
    from .state import LoopCheckpoint


@dataclass
class TrainHistory:
    epoch_loss: list[float] = field(default_factory=list)  # running objective
    epoch_expert_loss: list[list[float]] = field(default_factory=list)  # per expert
    # Measured exactly at the start and after each epoch: the calibration
    # alignment loss and the objective (alignment + reg_weight * R); the
    # coefficients with the lowest objective are kept.
    alignment: list[float] = field(default_factory=list)
    objective: list[float] = field(default_factory=list)
    kept_epoch: int = 0  # 0 = the starting coefficients
    steps: int = 0
    step_seconds: list[float] = field(default_factory=list)  # per optimizer step
    stopped_early: bool = False
    # prox: full-batch passes, and at the start the largest alignment gradient
    # against the regularizer's pull (ratio < 1: the start is the optimum).
    evaluations: int = 0
    start_gradient: float = 0.0
    start_pull: float = 0.0
    start_ratio: float = 0.0
    # prox, per trial: the forward and backward passes' seconds (the floor of
    # a step: what it costs with nothing to rebuild or project), and the base
    # and task-vector bytes the rebuild and the projection fetched.
    pass_seconds: list[float] = field(default_factory=list)
    bytes_read: list[int] = field(default_factory=list)

    @property
    def kept_alignment(self) -> float:
        return self.alignment[self.kept_epoch]

    def record(self, alignment: float, objective: float) -> bool:
        """Add an exact measurement; True when these coefficients are to be kept."""
        self.alignment.append(alignment)
        self.objective.append(objective)
        if len(self.alignment) == 1:
            return True
        if objective < self.objective[self.kept_epoch]:
            self.kept_epoch = len(self.alignment) - 1
            return True
        return False


def make_scheduler(optimizer, config: CalibrationConfig, total_steps: int):
    eta_min = 0.1 * config.step
    if config.schedule == "cosine_restarts":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer, T_0=50, T_mult=2, eta_min=eta_min
        )
    return torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(total_steps, 1), eta_min=eta_min
    )


@dataclass
class LoopState:
    """Everything the loop mutates, so a checkpoint can restore it exactly."""

    epoch: int = 0
    position: int = 0  # index in ``order`` of the next batch
    order: list[int] | None = None  # this epoch's sample order
    rng: list | None = None  # random.Random state for the next epochs' orders
    epoch_total: float = 0.0
    expert_sums: list[float] = field(default_factory=list)
    expert_counts: list[int] = field(default_factory=list)
    best_epoch_loss: float = math.inf
    stale: int = 0  # adamw: epochs without improvement; prox: flat steps
    done: bool = False
    # prox: the step size, rejected trials in a row, metric updates so far
    eta: float = 0.0
    rejections: int = 0
    metric_steps: int = 0
    history: TrainHistory = field(default_factory=TrainHistory)

    def to_json(self) -> dict:
        data = dict(self.__dict__)
        data["history"] = dict(self.history.__dict__)
        return data

    @classmethod
    def from_json(cls, data: dict) -> LoopState:
        data = dict(data)
        history = TrainHistory(**data.pop("history"))
        return cls(history=history, **data)


def _check_finite(value: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(value).all()):
        raise ExpertMergingError(
            f"non-finite {what}; the last good checkpoint is kept. Check the experts' "
            "weights and the calibration data, or lower calibration.lr"
        )


OnStep = Callable[[LoopState, Student, Any, Any, dict[str, torch.Tensor]], None]


def train_coefficients(
    student: Student,
    objective: Objective,
    config: CalibrationConfig,
    *,
    desc: str = "Stage 1",
    quiet: bool = False,
    expert_names: Sequence[str] | None = None,
    resume: LoopCheckpoint | None = None,
    on_step: OnStep | None = None,
) -> TrainHistory:
    """Train the student's coefficients; returns the loss history.

    ``on_step(state, student, optimizer, scheduler, kept)`` runs after every
    optimizer step (and once at the start), e.g. to checkpoint; ``resume``
    continues a loop saved that way, ending with the same coefficients as an
    uninterrupted run. The coefficients with the lowest objective are kept.
    """
    names = list(expert_names or [str(k) for k in range(objective.experts)])
    steps_per_epoch = math.ceil(len(objective.cache.experts) / config.accumulation)
    params = student.parameters()
    optimizer = scheduler = None
    if params:
        optimizer = torch.optim.AdamW(
            params, lr=config.step, weight_decay=config.weight_decay
        )
        scheduler = make_scheduler(optimizer, config, steps_per_epoch * config.epochs)
    rng = random.Random(config.seed)
    if resume is None:
        state = LoopState(
            expert_sums=[0.0] * objective.experts,
            expert_counts=[0] * objective.experts,
        )
        student.load()
        state.history.record(*objective.measure(student))
        kept = _snapshot(student)
        state.done = not params  # every coefficient fixed: nothing to train
        if on_step is not None:
            on_step(state, student, optimizer, scheduler, kept)
    else:
        state, kept = _restore(resume, student, rng, optimizer, scheduler)
    progress = tqdm(
        total=steps_per_epoch * config.epochs,
        initial=state.history.steps,
        desc=desc,
        disable=quiet,
    )
    while not state.done and state.epoch < config.epochs:
        if state.order is None:
            state.order = _epoch_samples(objective, rng)
            state.rng = list(rng.getstate())
        loss = _step(
            student, objective, config, state, optimizer, scheduler, desc, names
        )
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}")
        if state.position >= len(state.order):
            kept = _end_epoch(state, student, objective, config, steps_per_epoch, kept)
        if on_step is not None:
            on_step(state, student, optimizer, scheduler, kept)
    progress.close()
    student.load_raw(kept)
    student.zero_grad()
    return state.history


def _restore(resume: LoopCheckpoint, student: Student, rng, optimizer, scheduler):
    """Put a saved loop back: coefficients, random state, optimizer, schedule."""
    state = resume.loop
    if state.rng is not None:
        rng.setstate(_as_tuple(state.rng))
    kept = {name: t.clone() for name, t in resume.kept.items()}
    if optimizer is not None:
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
    student.load_raw(resume.raw)
    return state, kept


def _epoch_samples(objective: Objective, rng: random.Random) -> list[int]:
    """This epoch's sample order: round-robin over experts, each shuffled."""
    by_expert = [
        [i for i, e in enumerate(objective.cache.experts) if e == k]
        for k in range(objective.experts)
    ]
    counts = [len(b) for b in by_expert]
    return [by_expert[k][j] for k, j in epoch_order(counts, rng)]


def _step(
    student, objective, config, state, optimizer, scheduler, desc, names
) -> float:
    """One optimizer step over the next batch; returns its objective estimate."""
    experts = objective.experts
    history = state.history
    batch = state.order[state.position : state.position + config.accumulation]
    started = time.perf_counter()
    student.zero_grad()
    # Loss sums of this step: [data loss, per-expert sums, per-expert counts].
    tally = torch.zeros(1 + 2 * experts, dtype=torch.float64)
    for index in batch:
        if index not in objective.cache.samples:
            continue  # another rank's sample
        expert = objective.cache.experts[index]
        loss = objective.sample_loss(student, index)
        _check_finite(
            loss.detach(),
            f"loss in {desc}, step {history.steps + 1}, expert {names[expert]}, "
            f"sample {objective.cache.samples[index].record.where}",
        )
        # K/|batch| turns the sample mean into sum_k beta_k * mean_k.
        beta = objective.weights[expert]
        (beta * loss * experts / len(batch)).backward()
        tally[0] += beta * float(loss.detach()) * experts / len(batch)
        tally[1 + expert] += float(loss.detach())
        tally[1 + experts + expert] += 1
    grads = student.projected_grads()
    reduced = all_reduce_sum([tally, *grads.values()])
    tally, grads = reduced[0], dict(zip(grads, reduced[1:]))
    for k in range(experts):
        state.expert_sums[k] += float(tally[1 + k])
        state.expert_counts[k] += int(tally[1 + experts + k])
    for name, grad in grads.items():
        _check_finite(
            grad, f"coefficient gradient of {name} in {desc}, step {history.steps + 1}"
        )
    alphas = student.alphas()
    reg = objective.reg_weight * student.regularizer()
    surrogate = reg + sum((alphas[n] * grads[n]).sum() for n in alphas)
    surrogate.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
    optimizer.step()
    scheduler.step()
    student.load()
    if student.device.type == "cuda":
        torch.cuda.synchronize()
    release_freed_memory()  # else peak RSS drifts up with the number of steps
    history.step_seconds.append(round(time.perf_counter() - started, 4))
    history.steps += 1
    loss = float(tally[0]) + float(reg.detach())
    state.epoch_total += loss
    state.position += len(batch)
    return loss


def _end_epoch(state, student, objective, config, steps_per_epoch, kept):
    """Epoch bookkeeping: history, kept snapshot, early stopping."""
    history = state.history
    epoch_loss = state.epoch_total / steps_per_epoch
    history.epoch_loss.append(epoch_loss)
    history.epoch_expert_loss.append(
        [s / max(c, 1) for s, c in zip(state.expert_sums, state.expert_counts)]
    )
    if history.record(*objective.measure(student)):
        kept = _snapshot(student)
    if epoch_loss < state.best_epoch_loss - 1e-12:
        state.best_epoch_loss, state.stale = epoch_loss, 0
    else:
        state.stale += 1
        if state.stale >= config.patience:
            history.stopped_early = True
            state.done = True
    experts = len(state.expert_sums)
    state.epoch += 1
    state.position, state.order, state.epoch_total = 0, None, 0.0
    state.expert_sums, state.expert_counts = [0.0] * experts, [0] * experts
    return kept


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def _snapshot(student: Student) -> dict[str, torch.Tensor]:
    return {name: w.detach().clone() for name, w in student.raw.items()}
