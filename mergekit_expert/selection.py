"""Choices made on the calibration samples: ``init: auto`` and ``reg_weight: auto``.

``init: auto`` (:func:`select_init`) measures plain task arithmetic at each
value of ``init_grid``, calibrates from its lowest value and from the next
larger one on held-out folds, and applies the one-standard-error rule below to
those fits; the rest of this text is about ``reg_weight: auto``, the
regularizer's weight chosen on held-out calibration samples.

How strongly the coefficients should be held near the initial alpha depends on
the models, the data and the scale of the alignment loss, so no one value
suits every merge (README "How calibration works"). With ``auto`` each
expert's samples are dealt into two folds; on each fold the prox optimizer is
run along ``reg_grid`` from the largest weight to the smallest, each point
warm-started from the one before (a regularization path, half of
``max_steps`` per point), and the alignment
loss of the other fold is measured at every point, sample by sample. With
``init: auto`` the path's first point is the fit it made from the chosen start
(:class:`FoldFits`), not made again.

The choice follows the one-standard-error rule of cross-validation: the
largest weight whose held-out loss is within one standard error of the lowest
(the error of the paired, per-sample difference to the lowest point). With a
few samples per expert the held-out estimate is noisy; where the grid's losses
differ by less than that noise, a plain argmin picks a small weight by chance
and fits the few samples too closely, so the rule keeps the larger weight (the
smaller move from task arithmetic) unless the data clearly ask for less.

The rule only considers weights that keep every expert. The total adds the
experts' losses in their own units, so a smaller weight can lower it by
serving one domain (one whose loss grows steeply with the coefficients) at
another's expense; a merge is asked to serve every expert. So a weight whose
held-out loss of some expert is more than ``RISE_LIMIT`` standard errors above
that expert's loss at the grid's largest weight, and by more than
``TRADE_SHARE`` of what the total fell by there, is left out, even when its
total is lower. Measured on the quality benchmark's LoRA experts, every weight
under 0.8 raised code's held-out loss while arithmetic's fell more, and the
test gain fell with the weight (at 0.2 the largest expert rise was 1.9 to 20
standard errors over ten seeds, and 0.15 to 14 times the total's fall, or
more than all of it). The limit is two standard errors, not one: with a few
samples per expert and several experts per weight, a one-error test flags
some expert by chance too often, and each false flag sends the choice back to
a large weight. The share is there because a significant rise can still be
small beside the others' gains: on the full fine-tunes a flagged rise was at
most 0.095 of the total's fall in every default run, and on one seed such a
rise (0.04 of it) kept the largest weight, where the merge barely moved and
lost to task arithmetic while a smaller weight gained (README, "How
calibration works").

Expert Merging++'s stage 2 is checked on the same folds by the same rules
(:func:`check_stage2`): on each fold stage 1 and then stage 2 are fitted, and
stage 2 is kept only when it lowers the other fold's alignment by more than
one standard error and raises no expert's by more than ``RISE_LIMIT``. Its
extra coefficients can fit a few samples more closely than they generalize
(on the quality benchmark's LoRA experts, seeds 10-12, stage 2 lowered the
calibration loss and lost test gain on each); where the held-out samples
show no gain, the merge keeps stage 1's coefficients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from .config import PROX_LR, CalibrationConfig
from .objective import Objective
from .prox import train_prox
from .student import Student
from .train import train_coefficients

LOG = logging.getLogger(__name__)
FOLDS = 2
# a weight raising one expert's held-out loss by more standard errors than
# this over the largest weight, and by more than TRADE_SHARE of the total's
# fall there, is left out (reg_weight: auto; the stage 2 check uses the
# standard errors alone)
RISE_LIMIT = 2.0
TRADE_SHARE = 0.125


def folds(experts: Sequence[int], count: int) -> list[set[int]]:
    """Each expert's samples dealt in turn into ``count`` folds (by global index)."""
    dealt: list[set[int]] = [set() for _ in range(count)]
    for k in sorted(set(experts) - {-1}):
        indices = [i for i, e in enumerate(experts) if e == k]
        for position, index in enumerate(indices):
            dealt[position % count].add(index)
    return dealt


def paired_variance(part: torch.Tensor) -> float:
    """Variance of the sum of one expert's paired per-sample differences:
    n_k * var_k (0 with fewer than two samples)."""
    return len(part) * float(part.var()) if len(part) > 1 else 0.0


def within_one_se(
    shares: torch.Tensor, experts: Sequence[int], among: Sequence[int] | None = None
) -> tuple[int, int, list[float]]:
    """The one-standard-error choice over a path sorted from largest weight down.

    ``shares[g, i]``: sample i's part of the held-out alignment at point g
    (summed over i it is the point's held-out loss); ``experts[i]`` its expert
    (-1: not held out); ``among``: the points that may be chosen (default all).
    The difference of point g to the lowest point b is a sum over samples, so
    its variance is sum_k n_k * var_k(shares[g] - shares[b]) over each expert's
    samples. Returns (chosen, lowest of ``among``, the standard errors of every
    point's difference to it).
    """
    totals = shares.sum(dim=1)
    points = list(range(len(totals)) if among is None else among)
    lowest = min(points, key=lambda g: float(totals[g]))  # ties: larger
    owner = torch.tensor(list(experts))
    held = sorted(set(experts) - {-1})
    errors = []
    for g in range(len(totals)):
        difference = shares[g] - shares[lowest]
        variance = sum(paired_variance(difference[owner == k]) for k in held)
        errors.append(variance**0.5)
    chosen = next(g for g in points if float(totals[g] - totals[lowest]) <= errors[g])
    return chosen, lowest, errors


def expert_rises(
    shares: torch.Tensor, experts: Sequence[int], count: int
) -> tuple[list[list[float]], list[list[float]]]:
    """[point][expert]: how much each of ``count`` experts' held-out loss rose
    over point 0 (the largest weight), and the standard error of that rise
    (``paired_variance``)."""
    owner = torch.tensor(list(experts))
    rises, errors = [], []
    for point in shares:
        difference = point - shares[0]
        parts = [difference[owner == k] for k in range(count)]
        rises.append([float(part.sum()) for part in parts])
        errors.append([paired_variance(part) ** 0.5 for part in parts])
    return rises, errors


def raised_experts(
    rises: Sequence[Sequence[float]],
    errors: Sequence[Sequence[float]],
    share: float = 0.0,
) -> list[list[int]]:
    """[point]: the experts whose rise exceeds ``RISE_LIMIT`` standard errors
    and ``share`` of what the point's total fell by (with a total that did not
    fall, every such rise)."""
    raised = []
    for rise, error in zip(rises, errors):
        fall = max(-sum(rise), 0.0)
        raised.append(
            [
                k
                for k, (r, e) in enumerate(zip(rise, error))
                if r > RISE_LIMIT * e and r > share * fall
            ]
        )
    return raised


def fold_objectives(objective: Objective) -> list[tuple[Objective, Objective]]:
    """(fitted, held-out) objective of each fold: every sample is held out once."""
    experts = objective.cache.experts
    every = set(range(len(experts)))
    return [
        (
            replace(objective, cache=objective.cache.subset(every - fold)),
            replace(objective, cache=objective.cache.subset(fold)),
        )
        for fold in folds(experts, FOLDS)
    ]


@dataclass
class FoldFits:
    """Held-out fits already made, one per fold, from the same start: each
    sample's held-out alignment after them (summed over folds) and where each
    fold's fit ended, so that a path starting with the same fit continues
    from there instead of repeating it."""

    init: list[float]  # the start (the student's settled init)
    reg_weight: float
    shares: torch.Tensor  # [sample]
    ends: list[dict[str, torch.Tensor]]  # raw coefficients, per fold


def held_out_shares(
    student: Student,
    objective: Objective,
    points: int,
    restart: Callable[[], None],
    fit_point: Callable[[int, Objective], None],
    desc: str,
    quiet: bool = False,
    first: FoldFits | None = None,
) -> torch.Tensor:
    """[point, sample]: each sample's held-out alignment after each of ``points``
    successive fits, over the folds (every sample is held out in exactly one).

    On each fold ``restart()`` puts the student back at its start, then
    ``fit_point(p, fitted objective)`` trains it to point p in turn. With
    ``first`` the first point is that one, already fitted: each fold continues
    from where its fit ended.
    """
    shares = torch.zeros(points, len(objective.cache.experts), dtype=torch.float64)
    progress = tqdm(total=FOLDS * points, desc=desc, disable=quiet)
    for index, (fit, held) in enumerate(fold_objectives(objective)):
        if first is None:
            restart()
            fit_point(0, fit)
            shares[0] += held.shares(held.sample_losses(student))
        else:
            student.load_raw(first.ends[index])
        progress.update(1)
        for position in range(1, points):
            fit_point(position, fit)
            shares[position] += held.shares(held.sample_losses(student))
            progress.update(1)
    progress.close()
    if first is not None:
        shares[0] = first.shares
    return shares


def path_settings(settings: CalibrationConfig) -> CalibrationConfig:
    """The prox settings of a held-out fit: half of ``max_steps``, the run's step.

    Held-out fits always run the prox optimizer (with adamw the chosen values
    are then trained with adamw): gamma and the start belong to the objective,
    not to the loop.
    """
    return settings.model_copy(
        update={
            "max_steps": max(settings.max_steps // 2, 1),
            "lr": settings.step if settings.optimizer == "prox" else PROX_LR,
        }
    )


def fewest_samples(experts: Sequence[int], names: Sequence[str]) -> tuple[str, int]:
    """The expert with the fewest calibration samples, and how many it has."""
    fewest = min(range(len(names)), key=experts.count)
    return names[fewest], experts.count(fewest)


@dataclass
class InitSelection:
    """``init: auto``'s choice: task arithmetic's curve, then the held-out fits."""

    alpha: float
    curve: list[dict]  # task arithmetic at every grid value, smallest first
    candidates: list[float] = field(default_factory=list)  # the lowest first
    held_out: list[float] = field(default_factory=list)  # after a fit from each
    standard_errors: list[float] = field(default_factory=list)
    reg_weight: float | None = None  # the weight of those fits
    note: str | None = None
    # the chosen start's fits, for reg_weight: auto's path (not reported)
    fits: FoldFits | None = None

    def to_json(self) -> dict:
        return {
            "alpha": self.alpha,
            "candidates": self.candidates,
            "held_out_alignment": self.held_out,
            "standard_error": self.standard_errors,
            "reg_weight": self.reg_weight,
            "rule": "task arithmetic's lowest calibration alignment over init_grid "
            "and the next larger value are each calibrated on one fold at this "
            "reg_weight and measured on the other; the lowest is kept unless the "
            "larger's held-out alignment is lower by more than one standard error",
            "note": self.note,
        }


def select_init(
    student: Student,
    objective: Objective,
    settings: CalibrationConfig,
    names: Sequence[str],
    quiet: bool = False,
) -> InitSelection:
    """``init: auto``: the shared alpha calibration starts from.

    Plain task arithmetic is measured at every ``init_grid`` value; its lowest
    alignment and the next larger value are the candidates. From each, the
    coefficients are fitted on one fold of the samples (at the run's
    reg_weight, or ``reg_grid``'s largest with ``auto``) and measured on the
    other, and task arithmetic's lowest is kept unless the larger start's
    held-out alignment is lower by more than one standard error: the larger
    start must earn its place. Where the two fits were level within noise the
    larger lost (LoRA seed 14: held-out 3.802 from 0.3 against 3.793 from
    0.2, standard error 0.014; test gain 0.187 against 0.263).

    Why fit: calibration moves the coefficients away from the start, and the
    start it ends best from is not the one task arithmetic itself aligns best
    at. On six seeds of the quality benchmark's LoRA experts task arithmetic
    aligned best at 0.1, yet from 0.2 calibration reached a lower held-out
    alignment on each of them and retained 0.035 to 0.048 more test gain;
    on full fine-tunes the fits keep 0.1, where 0.2 lost 0.020 (README,
    "Differences from the paper"). Why the larger neighbour only: task
    arithmetic's alignment preferred a smaller alpha than the test did in both
    regimes, and starting below its lowest lost on each of five seeds.
    Returns the choice with both measurements. The student is left at the last
    fit; the caller resets it to the chosen start.
    """
    values = sorted(set(settings.init_grid), reverse=True)  # largest first
    losses = []
    for value in tqdm(values, desc="Init search (task arithmetic)", disable=quiet):
        student.set_uniform(value)
        losses.append(objective.sample_losses(student))
    shares = torch.stack([objective.shares(loss) for loss in losses])
    lowest = min(range(len(values)), key=lambda g: float(shares[g].sum()))
    curve = [
        {
            "alpha": value,
            "loss": float(shares[position].sum()),
            "expert_loss": objective.expert_means(losses[position]),
        }
        for position, value in enumerate(values)
    ][::-1]
    # task arithmetic's lowest first (the one-standard-error rule keeps the
    # first point within one error of the best), then the next larger value
    candidates = [values[lowest]]
    if lowest > 0:  # values run from the largest down
        candidates.append(values[lowest - 1])
    LOG.info(
        "init: task arithmetic's calibration alignment is lowest at alpha=%g (%g)",
        values[lowest],
        float(shares[lowest].sum()),
    )
    name, count = fewest_samples(objective.cache.experts, names)
    if len(candidates) == 1 or count < FOLDS:
        note = None
        if count < FOLDS:
            note = (
                f"expert {name} has {count} calibration sample, and init: auto "
                f"holds out half of each expert's samples, so it started from task "
                f"arithmetic's lowest alignment. Give every expert at least {FOLDS} "
                "samples, or set calibration.init to a number"
            )
            LOG.warning("%s", note)
        return InitSelection(values[lowest], curve, note=note)
    gamma = (
        max(settings.reg_grid)
        if settings.reg_weight == "auto"
        else float(settings.reg_weight)
    )
    fit_settings = path_settings(settings)

    def held_out_from(value: float) -> FoldFits:
        ends: list[dict[str, torch.Tensor]] = []  # where each fold's fit ended

        def restart() -> None:
            student.reset([value] * len(names))
            student.load()

        def fit(_: int, fitted: Objective) -> None:
            train_prox(
                student,
                replace(fitted, reg_weight=gamma),
                fit_settings,
                desc=f"init {value:g}",
                quiet=True,
                expert_names=names,
            )
            ends.append({n: w.detach().clone() for n, w in student.raw.items()})

        shares = held_out_shares(
            student,
            objective,
            1,
            restart,
            fit,
            f"init: auto (fit from {value:g})",
            quiet,
        )
        return FoldFits(list(student.init), gamma, shares[0], ends)

    fits = [held_out_from(value) for value in candidates]
    fitted = torch.stack([f.shares for f in fits])
    chosen, _, errors = within_one_se(fitted, objective.cache.experts)
    held_out = [float(v) for v in fitted.sum(dim=1)]
    LOG.info(
        "init: auto chose alpha=%g: calibrated from %s at reg_weight %g, the "
        "held-out alignment was %s (standard errors of the difference to the "
        "lowest %s); task arithmetic's lowest is kept unless the larger start "
        "is lower by more than one standard error",
        candidates[chosen],
        candidates,
        gamma,
        [round(v, 5) for v in held_out],
        [round(v, 5) for v in errors],
    )
    return InitSelection(
        candidates[chosen],
        curve,
        candidates,
        held_out,
        errors,
        gamma,
        fits=fits[chosen],
    )


@dataclass
class Selection:
    """The chosen weight and the held-out alignment at every grid point."""

    reg_weight: float
    grid: list[float]
    held_out: list[float]  # summed over folds; empty when nothing was held out
    standard_errors: list[float] = field(default_factory=list)  # of the
    # difference of each point's held-out loss to the lowest one
    lowest: float | None = None  # the weight with the lowest held-out loss
    note: str | None = None
    rises: list[list[float]] = field(default_factory=list)  # [point][expert],
    rise_errors: list[list[float]] = field(default_factory=list)  # over point 0
    # per point: the experts whose rise exceeds RISE_LIMIT errors; such points
    # are left out
    raised: list[list[str]] = field(default_factory=list)
    reused_init_fit: bool = False  # the first point was init: auto's fit

    def to_json(self) -> dict:
        return {
            "reg_weight": self.reg_weight,
            "reused_init_fit": self.reused_init_fit,
            "grid": self.grid,
            "held_out_alignment": self.held_out,
            "standard_error": self.standard_errors,
            "lowest": self.lowest,
            "expert_rise": self.rises,
            "expert_rise_error": self.rise_errors,
            "raised_experts": self.raised,
            "rise_limit": RISE_LIMIT,
            "trade_share": TRADE_SHARE,
            "rule": "among the reg_weights that raise no expert's held-out "
            f"alignment by more than {RISE_LIMIT:g} standard errors and "
            f"{TRADE_SHARE:g} of the total's fall over the largest, the largest "
            "within one standard error of their lowest held-out alignment",
            "note": self.note,
        }


def select_reg_weight(
    student: Student,
    objective: Objective,
    settings: CalibrationConfig,
    names: Sequence[str],
    quiet: bool = False,
    first: FoldFits | None = None,
) -> Selection:
    """Pick reg_weight from ``settings.reg_grid`` by held-out alignment (2 folds).

    ``first``: init: auto's fits from the chosen start. Made at the grid's
    largest weight with the path's settings on the same folds, they are the
    path's first point (2 of its fits), so the path continues from them when
    their start and weight are the run's. The student is left at its initial
    coefficients.
    """
    grid = sorted(set(settings.reg_grid), reverse=True)
    experts = objective.cache.experts
    name, count = fewest_samples(experts, names)
    if count < FOLDS:
        note = (
            f"expert {name} has {count} calibration sample, "
            f"and reg_weight: auto holds out half of each expert's samples, so it "
            f"used the grid's largest weight, {grid[0]:g}. Give every expert at "
            f"least {FOLDS} samples, or set calibration.reg_weight to a number"
        )
        LOG.warning("%s", note)
        return Selection(grid[0], grid, [], note=note)
    # Each point starts where the last one ended, so half the steps reach it.
    fit_settings = path_settings(settings)
    start = {n: w.detach().clone() for n, w in student.raw.items()}

    def fit_point(position: int, fit: Objective) -> None:
        train_prox(
            student,
            replace(fit, reg_weight=grid[position]),
            fit_settings,
            desc=f"reg_weight {grid[position]:g}",
            quiet=True,
            expert_names=names,
        )

    reuse = (
        first is not None and first.reg_weight == grid[0] and first.init == student.init
    )
    shares = held_out_shares(
        student,
        objective,
        len(grid),
        lambda: student.load_raw(start),
        fit_point,
        "reg_weight: auto (held-out path)",
        quiet,
        first if reuse else None,
    )
    student.load_raw(start)
    rises, rise_errors = expert_rises(shares, experts, len(names))
    raised = raised_experts(rises, rise_errors, TRADE_SHARE)
    kept = [g for g in range(len(grid)) if not raised[g]]  # point 0 always
    chosen, _, errors = within_one_se(shares, experts, among=kept)
    held_out = [float(v) for v in shares.sum(dim=1)]
    lowest = min(range(len(grid)), key=lambda g: held_out[g])
    LOG.info(
        "reg_weight: auto chose %g, the largest within one standard error of the "
        "lowest held-out alignment among the weights that keep every expert "
        "(%s over %s, standard errors %s)",
        grid[chosen],
        [round(v, 5) for v in held_out],
        grid,
        [round(v, 5) for v in errors],
    )
    named = [[names[k] for k in point] for point in raised]
    for gamma, who in zip(grid, named, strict=True):
        if who:
            LOG.info(
                "reg_weight %g left out: it raises the held-out alignment loss of "
                "%s by more than %g standard errors and %g of the total's fall "
                "over the largest weight",
                gamma,
                ", ".join(who),
                RISE_LIMIT,
                TRADE_SHARE,
            )
    return Selection(
        grid[chosen],
        grid,
        held_out,
        errors,
        grid[lowest],
        rises=rises,
        rise_errors=rise_errors,
        raised=named,
        reused_init_fit=reuse,
    )


@dataclass
class Stage2Check:
    """Whether stage 2 lowered the held-out alignment enough to be kept."""

    kept: bool
    held_out: list[float]  # stage 1, stage 2 (summed over folds)
    standard_error: float  # of the difference stage 2 - stage 1
    rises: list[float]  # per expert: stage 2's held-out loss - stage 1's
    rise_errors: list[float]
    raised: list[str]  # the experts whose rise exceeds RISE_LIMIT errors

    def to_json(self) -> dict:
        return {
            "kept": self.kept,
            "held_out_alignment": {
                "stage1": self.held_out[0],
                "stage2": self.held_out[1],
            },
            "standard_error": self.standard_error,
            "expert_rise": self.rises,
            "expert_rise_error": self.rise_errors,
            "raised_experts": self.raised,
            "rule": "stage 2 is kept when its held-out alignment is lower than "
            "stage 1's by more than one standard error and it raises no expert's "
            f"by more than {RISE_LIMIT:g} standard errors",
        }


def check_stage2(
    student: Student,
    objective: Objective,
    settings: CalibrationConfig,
    chunk: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], object],
    names: Sequence[str],
    quiet: bool = False,
) -> Stage2Check:
    """Fit stage 1 and then stage 2 on each fold and compare them on the other.

    ``chunk(alphas, raw)`` turns the student into stage 2's chunked layout,
    warm-started from a stage-1 fit (its allocation from that fit, as the run
    allocates from its own). The student is left at its initial coefficients.
    """
    experts = objective.cache.experts
    init = list(student.init)
    loop = train_prox if settings.optimizer == "prox" else train_coefficients

    def restart() -> None:
        student.reset(init)
        student.load()

    def fit_stage(stage: int, fit: Objective) -> None:
        if stage == 1:
            raw = {n: w.detach().clone() for n, w in student.raw.items()}
            chunk(student.all_alphas(), raw)
        loop(
            student,
            fit,
            settings if stage == 0 else settings.stage2(),
            desc=f"stage {stage + 1} (check)",
            quiet=True,
            expert_names=names,
        )

    shares = held_out_shares(
        student, objective, 2, restart, fit_stage, "Stage 2 check (held-out)", quiet
    )
    restart()
    chosen, _, errors = within_one_se(shares, experts)  # 1: stage 2 clearly lower
    rises, rise_errors = expert_rises(shares, experts, len(names))
    raised = [names[k] for k in raised_experts(rises, rise_errors)[1]]
    held_out = [float(v) for v in shares.sum(dim=1)]
    check = Stage2Check(
        kept=chosen == 1 and not raised,
        held_out=held_out,
        standard_error=max(errors),  # the lower point's own error is 0
        rises=rises[1],
        rise_errors=rise_errors[1],
        raised=raised,
    )
    LOG.info(
        "stage 2 check: held-out alignment stage 1 %.5g, stage 2 %.5g (standard "
        "error %.3g%s): stage 2 %s",
        held_out[0],
        held_out[1],
        check.standard_error,
        f"; raises {', '.join(raised)}" if raised else "",
        "kept" if check.kept else "not kept; the merge keeps stage 1's coefficients",
    )
    return check
