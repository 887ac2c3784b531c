"""``reg_weight: auto``: the regularizer's weight chosen on held-out calibration samples.

How strongly the coefficients should be held near the initial alpha depends on
the models, the data and the scale of the alignment loss, so no one value
suits every merge (README "How calibration works"). With ``auto`` each
expert's samples are dealt into two folds; on each fold the prox optimizer is
run along ``reg_grid`` from the largest weight to the smallest, each point
warm-started from the one before (a regularization path, half of
``max_steps`` per point), and the alignment
loss of the other fold is measured at every point. The weight whose summed
held-out loss is lowest is then used on all samples. Ties go to the larger
weight (the smaller move from task arithmetic).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from .config import PROX_LR, CalibrationConfig
from .objective import Objective
from .prox import train_prox
from .student import Student

LOG = logging.getLogger(__name__)
FOLDS = 2


def folds(experts: Sequence[int], count: int) -> list[set[int]]:
    """Each expert's samples dealt in turn into ``count`` folds (by global index)."""
    dealt: list[set[int]] = [set() for _ in range(count)]
    for k in sorted(set(experts) - {-1}):
        indices = [i for i, e in enumerate(experts) if e == k]
        for position, index in enumerate(indices):
            dealt[position % count].add(index)
    return dealt


@dataclass
class Selection:
    """The chosen weight and the held-out alignment at every grid point."""

    reg_weight: float
    grid: list[float]
    held_out: list[float]  # summed over folds; empty when nothing was held out
    note: str | None = None

    def to_json(self) -> dict:
        return {
            "reg_weight": self.reg_weight,
            "grid": self.grid,
            "held_out_alignment": self.held_out,
            "note": self.note,
        }


def select_reg_weight(
    student: Student,
    objective: Objective,
    settings: CalibrationConfig,
    names: Sequence[str],
    quiet: bool = False,
) -> Selection:
    """Pick reg_weight from ``settings.reg_grid`` by held-out alignment (2 folds).

    The student is left at its initial coefficients.
    """
    grid = sorted(set(settings.reg_grid), reverse=True)
    experts = objective.cache.experts
    fewest = min(range(len(names)), key=experts.count)
    if experts.count(fewest) < FOLDS:
        note = (
            f"expert {names[fewest]} has {experts.count(fewest)} calibration sample, "
            f"and reg_weight: auto holds out half of each expert's samples, so it "
            f"used the grid's largest weight, {grid[0]:g}. Give every expert at "
            f"least {FOLDS} samples, or set calibration.reg_weight to a number"
        )
        LOG.warning("%s", note)
        return Selection(grid[0], grid, [], note)
    split = folds(experts, FOLDS)
    every = set(range(len(experts)))
    held_out = [0.0] * len(grid)
    # Each point starts where the last one ended, so half the steps reach it.
    # The path always runs the prox optimizer (with adamw the chosen weight is
    # then trained with adamw): gamma belongs to the objective, not the loop.
    path_settings = settings.model_copy(
        update={
            "max_steps": max(settings.max_steps // 2, 1),
            "lr": settings.step if settings.optimizer == "prox" else PROX_LR,
        }
    )
    start = {n: w.detach().clone() for n, w in student.raw.items()}
    progress = tqdm(
        total=FOLDS * len(grid), desc="reg_weight: auto (held-out path)", disable=quiet
    )
    for fold in split:
        fit = replace(objective, cache=objective.cache.subset(every - fold))
        held = replace(objective, cache=objective.cache.subset(fold))
        student.load_raw(start)
        for position, gamma in enumerate(grid):
            train_prox(
                student,
                replace(fit, reg_weight=gamma),
                path_settings,
                desc=f"reg_weight {gamma:g}",
                quiet=True,
                expert_names=names,
            )
            with torch.no_grad():
                loss, _ = held.alignment(student)
            held_out[position] += loss
            progress.update(1)
    progress.close()
    student.load_raw(start)
    best = min(range(len(grid)), key=lambda i: (held_out[i], -grid[i]))
    LOG.info(
        "reg_weight: auto chose %g (held-out alignment %s over %s)",
        grid[best],
        [round(v, 5) for v in held_out],
        grid,
    )
    return Selection(grid[best], grid, held_out)
