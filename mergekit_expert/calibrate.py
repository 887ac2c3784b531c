"""Calibration, stage by stage (README "How calibration works", steps 2 to 4).

teacher pass -> student -> initial alpha -> stage 1 -> [importance -> stage 2]

Each stage is a function with typed inputs and outputs; :func:`calibrate`
runs them in order, saving a :class:`CalibrationState` after every optimizer
step so a killed run resumes where it stopped.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
from mergekit.options import MergeOptions

from .coefficients import CoefficientArtifact
from .config import CalibrationConfig, ExpertMergePlan
from .distributed import all_reduce_sum, barrier, gather_lists, is_main
from .errors import ExpertMergingError
from .importance import Allocation, allocate_chunks, layer_importance
from .memory import StageClock
from .multimodal import checkpoint_parameters
from .objective import Objective
from .output import WorkDir
from .placement import Placement
from .preflight import Checked
from .prox import train_prox
from .selection import check_stage2, select_init, select_reg_weight
from .sources import same_shape
from .state import CHECKPOINT, CalibrationState, LoopCheckpoint, load_state, save_state
from .student import Student, select_weights
from .task_vectors import CheckpointReader, load_task_vectors
from .teacher import (
    TeacherCache,
    TeacherJob,
    TeacherModel,
    has_tokenizer,
    run_teachers,
)
from .train import OnStep, TrainHistory, train_coefficients

LOG = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class CalibrationResult:
    """What calibration learned and measured; the report is built from it."""

    artifact: CoefficientArtifact
    settings: CalibrationConfig
    task_weights: list[float]
    hidden_layers: list[int]
    samples_per_expert: list[int]
    init_curve: list[dict]
    init_selection: dict | None  # init: auto's held-out fits
    reg_selection: dict | None  # reg_weight: auto's choice and its held-out path
    stage2_check: dict | None  # ++: whether stage 2 lowered held-out alignment
    stage1: TrainHistory
    stage2: TrainHistory | None
    allocation: Allocation | None
    expert_loss_final: list[float]
    # each expert's logit and hidden term at the start and at the end
    alignment_terms: dict[str, dict[str, list[float]]]
    pseudo_labels: list[dict]
    truncated_samples: int
    device: str
    precision: str
    task_vectors: str  # "resident" or "streamed"
    resumed: bool
    stages: dict[str, dict[str, float]]


def calibrate(
    plan: ExpertMergePlan,
    checked: Checked,
    options: MergeOptions,
    lora_cache: str,
    work: WorkDir | None = None,
) -> CalibrationResult:
    """Teacher pass, initial-alpha search and coefficient training (resumable)."""
    settings = plan.calibration
    torch.manual_seed(settings.seed)
    clock = StageClock()
    names = [e.name for e in plan.experts]
    base_dir, expert_dirs = local_models(plan, options, lora_cache, work)
    placement = Placement.for_run(settings, options)
    with clock.stage("teacher"):
        cache = teacher_pass(
            plan, checked, placement, base_dir, expert_dirs, work, options.quiet
        )
    state = read_state(work)
    task_weights = [e.task_weight for e in plan.experts]
    objective = Objective.from_config(
        cache, settings, checked.hidden_layers, task_weights
    )
    with clock.stage("student_setup"):
        student = build_student(settings, placement, base_dir, expert_dirs, names)
    if settings.alignment_scale == "base":
        objective = replace(objective, scales=base_scales(student, objective, names))
    init_fits = None  # init: auto's fits from its choice (not kept on resume)
    if state.init is None and plan.init_values() is None:
        with clock.stage("init_search"):
            start = select_init(student, objective, settings, names, options.quiet)
        init_fits = start.fits
        state.init = [start.alpha] * len(names)
        state.init_curve = start.curve
        state.init_selection = start.to_json()
    student.reset(state.init or plan.init_values() or [])
    state.init = list(student.init)  # the float32 alphas the raw init gives
    student.load()
    start_terms = objective.term_means(student)
    if settings.reg_weight == "auto":
        if state.reg_selection is None:
            with clock.stage("reg_weight_selection"):
                state.reg_selection = select_reg_weight(
                    student, objective, settings, names, options.quiet, init_fits
                ).to_json()
        chosen = float(state.reg_selection["reg_weight"])
        settings = settings.model_copy(update={"reg_weight": chosen})
        objective = replace(objective, reg_weight=chosen)
    train = _trainer(student, objective, state, work, options.quiet, names)
    if state.stage1 is None:
        with clock.stage("stage1"):
            state.stage1 = train(settings, "stage1")
        state.stage1_raw = {n: w.detach().clone() for n, w in student.raw.items()}
    else:
        student.load_raw(state.stage1_raw)
    alphas = student.all_alphas()
    stage2 = allocation = None
    if plan.method == "expert_merging_pp":
        selection = state.reg_selection
        if selection and selection["held_out_alignment"] and not state.stage2_check:
            # On the folds reg_weight: auto used (selection.py); a fixed
            # reg_weight has no folds, and stage 2 is always kept (the paper).
            save_progress(state, work)  # a kill during the check keeps stage 1
            with clock.stage("stage2_check"):
                state.stage2_check = check_stage2(
                    student,
                    objective,
                    settings,
                    lambda a, raw: prepare_stage2(student, a, raw, settings),
                    names,
                    options.quiet,
                ).to_json()
            save_progress(state, work)
            student.load_raw(state.stage1_raw)
        if state.stage2_check is None or state.stage2_check["kept"]:
            with clock.stage("stage2"):
                allocation = prepare_stage2(student, alphas, state.stage1_raw, settings)
                stage2 = train(settings.stage2(), "stage2")
            alphas = student.all_alphas()
    # one pass at the end: each expert's loss is its two terms added
    final_terms = objective.term_means(student)
    final_expert = [sum(pair) for pair in zip(*final_terms.values(), strict=True)]
    terms = {"start": start_terms, "final": final_terms}
    truncated = sum(s.truncated for s in cache.samples.values())
    return CalibrationResult(
        artifact=CoefficientArtifact(
            coefficients=alphas,
            method=plan.method,
            base=str(plan.base),
            experts=names,
            init=state.init,
            at_init=sorted(student.frozen),
        ),
        settings=settings,
        task_weights=task_weights,
        hidden_layers=list(objective.hidden_layers),
        samples_per_expert=[len(r) for r in checked.records],
        init_curve=state.init_curve,
        init_selection=state.init_selection,
        reg_selection=state.reg_selection,
        stage2_check=state.stage2_check,
        stage1=state.stage1,
        stage2=stage2,
        allocation=allocation,
        expert_loss_final=final_expert,
        alignment_terms=terms,
        pseudo_labels=gather_lists(cache.pseudo_labels),
        truncated_samples=int(all_reduce_sum([torch.tensor(float(truncated))])[0]),
        device=placement.device,
        precision=str(placement.dtype).replace("torch.", ""),
        task_vectors=student.task_vectors.mode,
        resumed=state.resumed,
        stages=clock.stages,
    )


def base_scales(
    student: Student, objective: Objective, names: Sequence[str]
) -> tuple[float, ...]:
    """Each expert's alignment loss at the base model (every alpha 0): the
    scale that makes its term the fraction of that distance still left."""
    student.set_uniform(0.0)
    _, per_expert = objective.alignment(student)
    for name, value in zip(names, per_expert):
        if value <= 1e-12:
            raise ExpertMergingError(
                f"expert {name}'s calibration loss at the base model is 0 (it equals "
                "the base on its samples), so alignment_scale: base cannot divide "
                "by it; use alignment_scale: absolute"
            )
    LOG.info("alignment scales (loss at the base): %s", per_expert)
    return tuple(per_expert)


# Beside each LoRA merge in the run's own cache: it was written to the end.
# mergekit creates the folder first and reuses any folder that exists, so a run
# killed while merging would otherwise resume from a half-written model.
FINISHED = ".finished"


def local_models(
    plan: ExpertMergePlan,
    options: MergeOptions,
    lora_cache: str,
    work: WorkDir | None = None,
) -> tuple[str, list[str]]:
    """Directories of the base and of each expert, LoRA adapters merged in."""
    trust = options.trust_remote_code
    # Only the run's own cache (in OUT.partial) is ours to clean; a
    # --lora-merge-cache belongs to the user and holds mergekit's merges.
    own = work is not None and os.path.abspath(lora_cache) == work.file("lora")

    def merge_all():
        if own and is_main() and os.path.isdir(lora_cache):
            for name in os.listdir(lora_cache):
                path = os.path.join(lora_cache, name)
                if os.path.isdir(path) and not os.path.exists(path + FINISHED):
                    LOG.warning("discarding %s: its LoRA merge was cut short", path)
                    shutil.rmtree(path)
        merged = [
            e.reference.merged(
                cache_dir=lora_cache,
                trust_remote_code=trust,
                lora_merge_dtype=options.lora_merge_dtype,
            )
            for e in plan.experts
        ]
        base = plan.base.merged(cache_dir=lora_cache, trust_remote_code=trust)
        if own and is_main():
            for ref in (*merged, base):
                if ref.model.path.startswith(lora_cache + os.sep):
                    open(ref.model.path + FINISHED, "w").close()
        return base, merged

    base_dir, merged = main_first(merge_all)
    cache_dir = options.transformers_cache
    return base_dir.local_path(cache_dir=cache_dir), [
        r.local_path(cache_dir=cache_dir) for r in merged
    ]


def teacher_pass(
    plan: ExpertMergePlan,
    checked: Checked,
    placement: Placement,
    base_dir: str,
    expert_dirs: Sequence[str],
    work: WorkDir | None,
    quiet: bool,
) -> TeacherCache:
    """The cached teacher targets: reopened from OUT.partial, or computed."""
    directory = work.file("teacher") if work is not None else None
    cache = TeacherCache.reopen(directory) if directory else None
    if cache is not None:
        return cache
    settings = plan.calibration
    experts = []
    for expert, path, vocabulary in zip(
        plan.experts, expert_dirs, checked.vocabularies
    ):
        tokenizers = tuple(
            p
            for p in (path, expert.reference.model.path, base_dir)
            if os.path.isdir(p) and has_tokenizer(p)
        )
        # added tokens: compare on the shared ones (mapped in preflight)
        mapping = vocabulary.mapping if vocabulary is not None else None
        experts.append(TeacherModel(expert.name, path, tokenizers, mapping))
    job = TeacherJob(
        placement=placement,
        hidden_layers=tuple(checked.hidden_layers),
        max_length=settings.max_length,
        max_new_tokens=settings.max_new_tokens,
        top_k=settings.teacher_top_k,
    )
    return run_teachers(experts, checked.records, job, directory=directory, quiet=quiet)


def build_student(
    settings: CalibrationConfig,
    placement: Placement,
    base_dir: str,
    expert_dirs: Sequence[str],
    expert_names: Sequence[str],
) -> Student:
    """One copy of the base with its task vectors; coefficients come with reset()."""
    model = placement.load(base_dir, student=True)
    params = checkpoint_parameters(
        model, CheckpointReader(base_dir, "the base model").files
    )
    names = select_weights(list(params), settings.exclude)
    if not names:
        raise ExpertMergingError(
            "calibration.exclude excludes every weight of the model; nothing to calibrate"
        )
    frozen: list[str] = []
    if settings.excluded == "init":  # merged at the initial alpha, not trained
        frozen = same_shape(
            [n for n in params if n not in names and params[n].is_floating_point()],
            base_dir,
            expert_dirs,
        )
    task_vectors = load_task_vectors(
        settings.task_vectors,
        names + frozen,
        params,
        base_dir,
        expert_dirs,
        expert_names,
    )
    return Student(
        model,
        task_vectors,
        activation=settings.activation,
        autocast=placement.autocast,
        parameters=params,
        frozen=frozen,
    )


def prepare_stage2(
    student: Student,
    stage1_alphas: dict[str, torch.Tensor],
    stage1_raw: dict[str, torch.Tensor],
    settings: CalibrationConfig,
) -> Allocation:
    """Importance-guided chunking of the student for stage 2 (same teacher cache)."""
    vectors = student.task_vectors
    numels = {n: vectors.numel(n) for n in vectors.names if n not in student.frozen}
    calibrated = {n: a for n, a in stage1_alphas.items() if n in numels}
    importance = layer_importance(calibrated, vectors.mean_abs(list(numels)), numels)
    allocation = allocate_chunks(
        importance, numels, settings.budget, settings.kappa, settings.allocation
    )
    init = student.init
    warm = settings.stage2_init == "warm"
    fixed = {
        name: stage1_alphas[name] if warm else torch.tensor(init)[:, None]
        for name, m in allocation.chunks.items()
        if m == 0
    }
    student.reset(
        init,
        chunks=allocation.trainable,
        start=stage1_raw if warm else None,
        fixed=fixed,
    )
    LOG.info(
        "stage 2: %d chunks over %d weights (budget %.1f), %d fixed",
        sum(allocation.chunks.values()),
        len(numels),
        allocation.budget,
        len(fixed),
    )
    return allocation


def read_state(work: WorkDir | None) -> CalibrationState:
    """The saved calibration state in OUT.partial, or a fresh one."""
    path = work.file(CHECKPOINT) if work is not None else None
    if path is None or not os.path.exists(path):
        return CalibrationState()
    try:
        return load_state(path)
    except Exception as error:  # a torn or older file: start over
        LOG.warning("ignoring unreadable %s (%s)", path, error)
        return CalibrationState()


def _trainer(
    student: Student,
    objective: Objective,
    state: CalibrationState,
    work: WorkDir | None,
    quiet: bool,
    names: Sequence[str],
) -> Callable[[CalibrationConfig, str], TrainHistory]:
    """train(settings, phase): one stage's loop, resumed and checkpointed."""

    def train(settings: CalibrationConfig, phase: str) -> TrainHistory:
        loop = train_prox if settings.optimizer == "prox" else train_coefficients
        return loop(
            student,
            objective,
            settings,
            desc=phase.replace("stage", "Stage "),
            quiet=quiet,
            expert_names=names,
            resume=state.loop_for(phase),
            on_step=_checkpointer(state, work, phase),
        )

    return train


def save_progress(state: CalibrationState, work: WorkDir | None) -> None:
    """Save a finished phase's result at once (rank 0 alone)."""
    if work is not None and is_main():
        save_state(work.file(CHECKPOINT), state)


def _checkpointer(
    state: CalibrationState, work: WorkDir | None, phase: str
) -> OnStep | None:
    """Save the state after every optimizer step (rank 0 alone)."""
    if work is None or not is_main():
        return None

    def on_step(loop, student, optimizer, scheduler, kept) -> None:
        state.loop = LoopCheckpoint(
            phase=phase,
            loop=loop,
            raw=dict(student.raw),
            kept=kept,
            optimizer=optimizer.state_dict() if optimizer is not None else None,
            scheduler=scheduler.state_dict() if scheduler is not None else None,
        )
        save_state(work.file(CHECKPOINT), state)

    return on_step


def main_first(action: Callable[[], T]) -> T:
    """Run ``action`` on rank 0, then on the other ranks (which reuse its files)."""
    if is_main():
        result = action()
        barrier()
    else:
        barrier()
        result = action()
    return result
