"""Coefficient training: one readable loop (AdamW, cosine schedule, accumulation).

Each optimizer step accumulates weight gradients of ``accumulation`` samples,
projects them onto the task vectors (exact coefficient gradients), adds the
regularizer's gradient and steps the raw coefficients; the student then reloads
its merged weights from the new coefficients.
"""

from __future__ import annotations

import ctypes
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .config import CalibrationConfig
from .data import epoch_order
from .distributed import all_reduce_sum
from .objective import hidden_loss, logit_loss
from .student import Student
from .teacher import TeacherCache


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


def sample_loss(
    student: Student,
    cache: TeacherCache,
    index: int,
    config: CalibrationConfig,
    hidden_layers: Sequence[int],
) -> torch.Tensor:
    """L_logit + w_h * L_hid of one sample against its own expert."""
    sample = cache.samples[index]
    target = cache.target(index)
    mask = sample.align_mask(config.align)
    use_hidden = config.hidden_weight > 0 and bool(hidden_layers)
    logits, hidden = student.forward(
        sample.input_ids, hidden_layers if use_hidden else (), sample.extra_inputs()
    )
    device = logits.device
    if mask is not None:
        mask = mask.to(device)
    loss = logits.new_zeros(())
    if config.logit_weight > 0:
        indices = target.indices.to(device) if target.indices is not None else None
        loss = loss + config.logit_weight * logit_loss(
            logits, target.logits.to(device), config.temperature, mask, indices
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
    experts = len(task_weights)
    sums = torch.zeros(experts, dtype=torch.float64)
    counts = torch.zeros(experts, dtype=torch.float64)
    for index, sample in sorted(cache.samples.items()):
        sums[sample.expert] += float(
            sample_loss(student, cache, index, config, hidden_layers)
        )
        counts[sample.expert] += 1
    sums, counts = all_reduce_sum([sums, counts])  # this rank's samples -> all
    means = [float(s / c) if c else 0.0 for s, c in zip(sums, counts)]
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
    stale: int = 0
    done: bool = False
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


@dataclass
class Resume:
    """A saved loop: its state, raw coefficients, kept snapshot and optimizer."""

    loop: LoopState
    raw: dict[str, torch.Tensor]
    kept: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict


def _check_finite(value: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(value).all()):
        from .errors import ExpertMergingError

        raise ExpertMergingError(
            f"non-finite {what}; the last good checkpoint is kept. Check the experts' "
            "weights and the calibration data, or lower calibration.lr"
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
    expert_names: Sequence[str] | None = None,
    resume: Resume | None = None,
    on_step=None,
) -> TrainHistory:
    """Train the student's coefficients; returns the loss history.

    ``on_step(state, student, optimizer, scheduler, kept)`` runs after every
    optimizer step (and once at the start), e.g. to checkpoint; ``resume``
    continues a loop saved that way, ending with the same coefficients as an
    uninterrupted run.
    """
    experts = len(task_weights)
    names = list(expert_names or [str(k) for k in range(experts)])
    by_expert = [
        [i for i, e in enumerate(cache.experts) if e == k] for k in range(experts)
    ]
    steps_per_epoch = math.ceil(len(cache.experts) / config.accumulation)
    params = student.parameters()
    optimizer = (
        torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        if params
        else None
    )
    scheduler = (
        make_scheduler(optimizer, config, steps_per_epoch * config.epochs)
        if params
        else None
    )
    if resume is None:
        rng = random.Random(config.seed)
        state = LoopState(expert_sums=[0.0] * experts, expert_counts=[0] * experts)
        student.load()
        state.history.record(
            *_measure(student, cache, config, hidden_layers, task_weights)
        )
        kept = _snapshot(student)
        state.done = not params  # every coefficient fixed: nothing to train
        if on_step is not None:
            on_step(state, student, optimizer, scheduler, kept)
    else:
        state = resume.loop
        rng = random.Random(config.seed)
        if state.rng is not None:
            rng.setstate(_as_tuple(state.rng))
        with torch.no_grad():
            for name, w in student.raw.items():
                w.copy_(resume.raw[name])
        kept = {name: t.clone() for name, t in resume.kept.items()}
        if optimizer is not None:
            optimizer.load_state_dict(resume.optimizer)
            scheduler.load_state_dict(resume.scheduler)
        student.load()
    history = state.history
    progress = tqdm(
        total=steps_per_epoch * config.epochs,
        initial=history.steps,
        desc=desc,
        disable=quiet,
    )
    while not state.done and state.epoch < config.epochs:
        if state.order is None:
            counts = [len(b) for b in by_expert]
            state.order = [by_expert[k][j] for k, j in epoch_order(counts, rng)]
            state.rng = list(rng.getstate())
        batch = state.order[state.position : state.position + config.accumulation]
        started = time.perf_counter()
        student.zero_grad()
        # Loss sums of this step: [data loss, per-expert sums, per-expert counts].
        tally = torch.zeros(1 + 2 * experts, dtype=torch.float64)
        for index in batch:
            if index not in cache.samples:
                continue  # another rank's sample
            expert = cache.experts[index]
            loss = sample_loss(student, cache, index, config, hidden_layers)
            _check_finite(
                loss.detach(),
                f"loss in {desc}, step {history.steps + 1}, expert {names[expert]}, "
                f"sample {cache.samples[index].record.where}",
            )
            # K/|batch| turns the sample mean into sum_k beta_k * mean_k.
            (task_weights[expert] * loss * experts / len(batch)).backward()
            tally[0] += (
                task_weights[expert] * float(loss.detach()) * experts / len(batch)
            )
            tally[1 + expert] += float(loss.detach())
            tally[1 + experts + expert] += 1
        grads = student.projected_grads()
        reduced = all_reduce_sum([tally, *grads.values()])
        tally, grads = reduced[0], dict(zip(grads, reduced[1:]))
        data_loss = float(tally[0])
        for k in range(experts):
            state.expert_sums[k] += float(tally[1 + k])
            state.expert_counts[k] += int(tally[1 + experts + k])
        for name, grad in grads.items():
            _check_finite(
                grad,
                f"coefficient gradient of {name} in {desc}, step {history.steps + 1}",
            )
        alphas = student.alphas()
        reg = config.reg_weight * student.regularizer()
        surrogate = reg + sum((alphas[n] * grads[n]).sum() for n in alphas)
        surrogate.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        student.load()
        if student.device.type == "cuda":
            torch.cuda.synchronize()
        _release_freed_memory()
        history.step_seconds.append(round(time.perf_counter() - started, 4))
        history.steps += 1
        state.epoch_total += data_loss + float(reg.detach())
        state.position += len(batch)
        progress.update(1)
        progress.set_postfix(loss=f"{data_loss + float(reg.detach()):.4f}")
        if state.position >= len(state.order):
            kept = _end_epoch(
                state,
                student,
                cache,
                config,
                hidden_layers,
                task_weights,
                steps_per_epoch,
                kept,
            )
        if on_step is not None:
            on_step(state, student, optimizer, scheduler, kept)
    progress.close()
    with torch.no_grad():
        for name, w in student.raw.items():
            w.copy_(kept[name])
    student.load()
    student.zero_grad()
    return history


def _end_epoch(
    state, student, cache, config, hidden_layers, task_weights, steps_per_epoch, kept
):
    """Epoch bookkeeping: history, kept snapshot, early stopping."""
    history = state.history
    epoch_loss = state.epoch_total / steps_per_epoch
    history.epoch_loss.append(epoch_loss)
    history.epoch_expert_loss.append(
        [s / max(c, 1) for s, c in zip(state.expert_sums, state.expert_counts)]
    )
    if history.record(*_measure(student, cache, config, hidden_layers, task_weights)):
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


def _measure(
    student, cache, config, hidden_layers, task_weights
) -> tuple[float, float]:
    """(alignment loss, objective) at the loaded coefficients, over every sample."""
    aligned, _ = alignment_loss(student, cache, config, hidden_layers, task_weights)
    reg = float(student.regularizer().detach()) if student.raw else 0.0
    return aligned, aligned + config.reg_weight * reg


def _release_freed_memory() -> None:
    """Hand freed heap back to the OS after a step (glibc keeps large freed
    temporaries otherwise, so peak RSS would drift with the number of steps)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def _snapshot(student: Student) -> dict[str, torch.Tensor]:
    return {name: w.detach().clone() for name, w in student.raw.items()}
