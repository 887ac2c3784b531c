"""The default optimizer: full-batch proximal gradient with a monotone line search.

The objective F(alpha) = A(alpha) + gamma * R(alpha) is a deterministic
function of a few hundred coefficients over a small cached set of samples, so
each step uses the exact gradient of A over every sample (one forward and
backward pass per sample, accumulated) and treats the L1 term R exactly:

    D    = sqrt(EMA_0.9(g^2)), floored at 0.1 * its mean     (a diagonal metric)
    z    = alpha - eta * g / D
    a'   = clip(init + soft(z - init, eta * gamma * w / D))  (w: R's weight per slot)

with D rescaled so that eta is the largest move of any coefficient. A trial is
kept only when the exact F falls; eta grows (x1.5) after a step whose quadratic
model held, shrinks (x0.7) when it did not, and halves on a rejected trial.
Coefficients whose alignment gradient is smaller than the regularizer's pull
stay exactly at their start, as the L1 term asks. The loop stops after
``max_steps`` accepted steps, six rejections in a row, or three accepted steps
that each gained less than 1e-6 of the starting objective. F never rises, so
the result is never worse than the start.

Alphas live in alpha-space here (the student's raw coefficients are their
inverse activation); with the sigmoid they stay inside (EPSILON, 1 - EPSILON).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .config import CalibrationConfig
from .distributed import all_reduce_sum
from .errors import ExpertMergingError
from .objective import Objective
from .student import EPSILON, Student
from .train import LoopState, OnStep, TrainHistory

if TYPE_CHECKING:
    from .state import LoopCheckpoint

GROW, SHRINK, BACKOFF = 1.5, 0.7, 0.5
MAX_REJECTIONS = 6
FLAT_STEPS, FLAT_GAIN = 3, 1e-6
METRIC_DECAY, METRIC_FLOOR = 0.9, 0.1


@dataclass
class Point:
    """The objective, its alignment part and dA/dalpha at some alphas."""

    alphas: dict[str, torch.Tensor]
    alignment: float
    objective: float
    grads: dict[str, torch.Tensor]
    expert_loss: list[float] = field(default_factory=list)
    pass_seconds: float = 0.0  # the forward and backward passes alone
    bytes_read: int = 0  # base and task-vector bytes fetched (rebuild, projection)


def train_prox(
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
    """Minimize the student's objective; returns the loss history.

    ``on_step(state, student, optimizer, None, kept)`` runs after the start and
    after every trial, so a resume continues bit for bit.
    """
    names = list(expert_names or [str(k) for k in range(objective.experts)])
    run = ProxRun(student, objective, config, desc, names)
    if resume is None:
        state = LoopState()
        here = run.evaluate(student_alphas(student), step=0)
        state.history.record(here.alignment, here.objective)
        state.history.evaluations = 1
        state.eta = config.step
        state.done = not student.raw
        run.start_diagnostics(here, state)
    else:
        state = resume.loop
        here = run.restore(resume)
    progress = tqdm(
        total=config.max_steps, initial=state.history.steps, desc=desc, disable=quiet
    )
    run.checkpoint(state, here, on_step)
    while not state.done:
        accepted, here = run.trial(state, here)
        if accepted:
            progress.update(1)
            progress.set_postfix(objective=f"{here.objective:.4f}")
        run.checkpoint(state, here, on_step)
    progress.close()
    student.load_alphas(here.alphas)
    student.zero_grad()
    return state.history


def student_alphas(student: Student) -> dict[str, torch.Tensor]:
    return {name: a.detach().clone() for name, a in student.alphas().items()}


class ProxRun:
    """One prox loop: its fixed quantities and its steps."""

    def __init__(
        self,
        student: Student,
        objective: Objective,
        config: CalibrationConfig,
        desc: str,
        names: Sequence[str],
    ):
        self.student, self.objective, self.config = student, objective, config
        self.desc, self.names = desc, names
        count = len(student.raw) + len(student.fixed)
        self.pull = {  # gamma * (the regularizer's weight of each slot)
            name: (objective.reg_weight * student.shares[name] / count).expand_as(raw)
            for name, raw in student.raw.items()
        }
        device = student.device
        init = torch.tensor(student.init, dtype=torch.float32, device=device)[:, None]
        self.target = {name: init.expand_as(raw) for name, raw in student.raw.items()}
        self.box = (EPSILON, 1 - EPSILON) if config.activation == "sigmoid" else None
        self.second_moment = {
            name: torch.zeros_like(raw) for name, raw in student.raw.items()
        }

    # --- the exact objective -------------------------------------------------

    def evaluate(self, alphas: dict[str, torch.Tensor], step: int) -> Point:
        """F, A and dA/dalpha at ``alphas``: every sample, forward and backward."""
        student, objective = self.student, self.objective
        bytes_before = student.task_vectors.bytes_read
        student.load_alphas(alphas)
        student.zero_grad()
        experts = objective.experts
        counts = [max(objective.cache.experts.count(k), 1) for k in range(experts)]
        # A = sum_k w_k / n_k * sum of expert k's sample losses: one backward
        # per sample with that factor accumulates dA/dtheta for every weight.
        factors = [w / n for w, n in zip(objective.weights, counts)]
        sums = torch.zeros(experts, dtype=torch.float64)
        passes = time.perf_counter()
        for index, sample in sorted(objective.cache.samples.items()):
            loss = objective.sample_loss(student, index)
            if not bool(torch.isfinite(loss.detach())):
                raise ExpertMergingError(
                    f"non-finite loss in {self.desc}, step {step}, expert "
                    f"{self.names[sample.expert]}, sample {sample.record.where}; check "
                    "the experts' weights and the calibration data"
                )
            (loss * factors[sample.expert]).backward()
            sums[sample.expert] += float(loss.detach())
        if student.device.type == "cuda":
            torch.cuda.synchronize()
        passes = time.perf_counter() - passes
        grads = student.projected_grads()
        reduced = all_reduce_sum([sums, *grads.values()])
        sums, grads = reduced[0], dict(zip(grads, reduced[1:]))
        means = [float(s) / n for s, n in zip(sums, counts)]
        for name, grad in grads.items():
            if not bool(torch.isfinite(grad).all()):
                raise ExpertMergingError(
                    f"non-finite coefficient gradient of {name} in {self.desc}, step "
                    f"{step}; check the experts' weights and the calibration data"
                )
        alignment = sum(w * m for w, m in zip(objective.weights, means))
        reg = float(student.regularizer().detach())
        return Point(
            student_alphas(student),  # what the raw coefficients really give
            alignment,
            alignment + objective.reg_weight * reg,
            grads,
            means,
            passes,
            student.task_vectors.bytes_read - bytes_before,
        )

    # --- one step ------------------------------------------------------------

    def trial(self, state: LoopState, here: Point) -> tuple[bool, Point]:
        """Propose a step from ``here`` and keep it if F falls."""
        config, history = self.config, state.history
        started = time.perf_counter()
        metric = self._metric(state, here)
        while True:
            proposal = self._propose(here, metric, state.eta)
            if any(bool((proposal[n] != here.alphas[n]).any()) for n in proposal):
                break
            state.eta *= 2  # every move thresholded away: a longer step may move some
            if state.eta > 1e3:
                state.done = True
                return False, here
        trial = self.evaluate(proposal, history.steps + 1)
        history.evaluations += 1
        history.pass_seconds.append(round(trial.pass_seconds, 4))
        history.bytes_read.append(trial.bytes_read)
        if trial.objective < here.objective:
            move = {n: proposal[n] - here.alphas[n] for n in proposal}
            model = here.alignment + sum(
                float((here.grads[n] * move[n]).sum())
                + float((metric[n] * move[n] ** 2).sum()) / (2 * state.eta)
                for n in move
            )
            gain = here.objective - trial.objective
            state.eta *= GROW if trial.alignment <= model + 1e-12 else SHRINK
            state.rejections = 0
            history.steps += 1
            history.step_seconds.append(round(time.perf_counter() - started, 4))
            history.epoch_expert_loss.append(trial.expert_loss)
            history.epoch_loss.append(trial.objective)
            history.record(trial.alignment, trial.objective)
            start = history.objective[0]
            state.stale = state.stale + 1 if gain < FLAT_GAIN * abs(start) else 0
            state.done = history.steps >= config.max_steps or state.stale >= FLAT_STEPS
            return True, trial
        state.eta *= BACKOFF
        state.rejections += 1
        state.done = state.rejections >= MAX_REJECTIONS
        self.student.load_alphas(here.alphas)  # the rejected trial is not kept
        return False, here

    def _metric(self, state: LoopState, here: Point) -> dict[str, torch.Tensor]:
        """The diagonal metric, rescaled so that eta is the largest move."""
        state.metric_steps += 1
        grads = self._free(here)
        for name, grad in grads.items():
            moment = self.second_moment[name]
            moment.mul_(METRIC_DECAY).add_((1 - METRIC_DECAY) * grad * grad)
        correction = 1 - METRIC_DECAY**state.metric_steps
        root = {n: (m / correction).sqrt() for n, m in self.second_moment.items()}
        mean = torch.cat([r.reshape(-1) for r in root.values()]).mean()
        floor = METRIC_FLOOR * mean if float(mean) > 0 else torch.tensor(1.0)
        root = {n: torch.maximum(r, floor).clamp(min=1e-30) for n, r in root.items()}
        largest = max(
            float(((grads[n].abs() + self.pull[n]) / root[n]).max()) for n in root
        )
        return {n: r * max(largest, 1e-30) for n, r in root.items()}

    def _free(self, here: Point) -> dict[str, torch.Tensor]:
        """The gradient, zero where a coefficient sits on the box and g pushes out."""
        if self.box is None:
            return here.grads
        low, high = self.box
        return {
            n: torch.where(
                ((a <= low) & (here.grads[n] > 0))
                | ((a >= high) & (here.grads[n] < 0)),
                torch.zeros_like(a),
                here.grads[n],
            )
            for n, a in here.alphas.items()
        }

    def _propose(
        self, here: Point, metric: dict[str, torch.Tensor], eta: float
    ) -> dict[str, torch.Tensor]:
        proposal = {}
        for name, alpha in here.alphas.items():
            step = eta / metric[name]
            shifted = alpha - step * here.grads[name] - self.target[name]
            threshold = step * self.pull[name]
            shrunk = shifted.sign() * (shifted.abs() - threshold).clamp(min=0)
            value = self.target[name] + shrunk
            if self.box is not None:
                value = value.clamp(*self.box)
            proposal[name] = value
        return proposal

    # --- diagnostics, checkpoints ------------------------------------------

    def start_diagnostics(self, here: Point, state: LoopState) -> None:
        """The largest alignment gradient against the regularizer's pull, at the
        start: when no gradient beats the pull, the start is the optimum."""
        free = self._free(here)
        ratio = max(
            (
                float((free[n].abs() / self.pull[n].clamp(min=1e-30)).max())
                for n in free
            ),
            default=0.0,
        )
        state.history.start_gradient = max(
            (float(free[n].abs().max()) for n in free), default=0.0
        )
        state.history.start_pull = min(
            (float(self.pull[n].min()) for n in self.pull), default=0.0
        )
        state.history.start_ratio = ratio if math.isfinite(ratio) else 0.0

    def checkpoint(self, state: LoopState, here: Point, on_step: OnStep | None) -> None:
        if on_step is None:
            return
        optimizer = _ProxState(self, here, state)
        on_step(state, self.student, optimizer, None, student_raw(self.student))

    def restore(self, resume: LoopCheckpoint) -> Point:
        """The point and metric a saved loop stood at (no pass needed)."""
        saved = resume.optimizer or {}
        group = saved["param_groups"][0]
        names = list(self.student.raw)
        for index, name in enumerate(names):
            tensors = saved["state"][index]
            self.second_moment[name] = tensors["second_moment"].to(self.student.device)
        self.student.load_raw(resume.raw)
        here = Point(
            student_alphas(self.student),
            group["alignment"],
            group["objective"],
            {
                name: saved["state"][i]["grad"].to(self.student.device)
                for i, name in enumerate(names)
            },
            group["expert_loss"],
        )
        return here


def student_raw(student: Student) -> dict[str, torch.Tensor]:
    return {name: w.detach().clone() for name, w in student.raw.items()}


class _ProxState:
    """The prox loop's state in the optimizer checkpoint format (state_dict)."""

    def __init__(self, run: ProxRun, here: Point, state: LoopState):
        self.run, self.here, self.state = run, here, state

    def state_dict(self) -> dict[str, Any]:
        names = list(self.run.student.raw)
        return {
            "param_groups": [
                {
                    "alignment": self.here.alignment,
                    "objective": self.here.objective,
                    "expert_loss": self.here.expert_loss,
                }
            ],
            "state": {
                index: {
                    "grad": self.here.grads[name].detach().cpu(),
                    "second_moment": self.run.second_moment[name].detach().cpu(),
                }
                for index, name in enumerate(names)
            },
        }
