"""Calibrate, then let mergekit's own streaming writer emit the merged model.

Order of work: validate everything that can be validated without loading a
model (config keys, calibration files, tensor shapes from safetensors headers,
an existing artifact, and where the run may write); then the teacher pass; then
coefficient training; then ``mergekit.merge.run_merge`` with the artifact;
then the report. Nothing is written to OUT before the merge is complete: it is
staged in ``OUT.partial`` and moved into place at the end.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from pydantic import ValidationError

from .checkpoint import CHECKPOINT, fingerprint, save_state
from .coefficients import ARTIFACT_DIR, ARTIFACT_NAME, CoefficientArtifact
from .config import ExpertMergePlan, parse_plan
from .distributed import all_reduce_sum, barrier, gather_lists, is_main, world_size
from .distributed import setup as setup_distributed
from .errors import ExpertMergingError
from .importance import (
    Allocation,
    allocate_chunks,
    layer_importance,
)
from .multimodal import checkpoint_parameters
from .output import InputPath, WorkDir, check_output_location, check_replaceable
from .preflight import (
    Checked,
    check_device,
    model_inputs,
    option_inputs,
    preflight,
    resolve_models,
)
from .report import card_section, plot_coefficients, write_json
from .student import Student, select_weights
from .task_vectors import (
    CheckpointReader,
    ResidentTaskVectors,
    StreamedTaskVectors,
    TaskVectors,
    choose_mode,
)
from .teacher import Placement, TeacherCache, has_tokenizer, run_teachers
from .train import (
    LoopState,
    Resume,
    TrainHistory,
    alignment_loss,
    search_init,
    train_coefficients,
)

LOG = logging.getLogger(__name__)


@dataclass
class StageClock:
    """Wall time and peak resident memory at the end of each stage."""

    stages: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        own_peak = reset_stage_peak()
        yield
        entry = {
            "wall_s": round(time.perf_counter() - start, 3),
            "peak_rss_mib": round(peak_rss_bytes() / 2**20, 1),
        }
        if own_peak:
            entry["stage_peak_rss_mib"] = round(stage_peak_bytes() / 2**20, 1)
        if torch.cuda.is_available():
            entry["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        self.stages[name] = entry


def peak_rss_bytes() -> int:
    """The process's peak resident memory since it started."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_stage_peak() -> bool:
    """Restart the kernel's peak-RSS count (Linux), so a stage reports its own peak.

    Only with ``MERGEKIT_EXPERT_STAGE_PEAKS=1`` (benchmarks): the reset also
    clears the process's ``ru_maxrss``, which outside tools read at exit.
    """
    if os.environ.get("MERGEKIT_EXPERT_STAGE_PEAKS") != "1":
        return False
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def stage_peak_bytes() -> int:
    """Peak resident memory since the last :func:`reset_stage_peak` (VmHWM)."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _tokenizer_candidates(
    local: str, reference: ModelReference, base: str
) -> list[str]:
    paths = [local, reference.model.path, base]
    return [p for p in paths if os.path.isdir(p) and has_tokenizer(p)]


def load_task_vectors(
    mode: str,
    names: Sequence[str],
    params: dict[str, torch.nn.Parameter],
    base_dir: str,
    expert_dirs: Sequence[str],
    expert_names: Sequence[str],
) -> TaskVectors:
    """The base and tau_k = expert_k - base of each calibrated weight, resident or streamed.

    ``params``: the base model's parameters by checkpoint name.
    """
    device = params[names[0]].device
    mode = choose_mode(
        mode, sum(params[n].numel() for n in names), len(expert_dirs), device
    )
    if mode == "streamed":
        return StreamedTaskVectors(base_dir, expert_dirs, expert_names, names)
    readers = [
        CheckpointReader(d, f"expert {n}") for d, n in zip(expert_dirs, expert_names)
    ]
    base, stacked = {}, {}
    for name in names:
        flat = params[name].detach().reshape(-1).to(torch.float32)
        if not bool(torch.isfinite(flat).all()):
            raise ExpertMergingError(
                f"the base model's tensor {name} holds NaN or infinite values"
            )
        rows = []
        for expert, reader in zip(expert_names, readers):
            tensor = reader.get(name).to(flat.device)
            if tensor.numel() != flat.numel():
                raise ExpertMergingError(
                    f"tensor {name} has {tensor.numel()} elements in expert {expert} but "
                    f"{flat.numel()} in the base"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise ExpertMergingError(
                    f"expert {expert}'s tensor {name} holds NaN or infinite values; "
                    "fix or re-export that checkpoint"
                )
            rows.append(tensor.reshape(-1) - flat)
        base[name] = flat.clone()
        stacked[name] = torch.stack(rows)
    return ResidentTaskVectors(base, stacked)


class Checkpointer:
    """Saves the calibration state after every optimizer step; restores it on resume.

    Besides the running loop it holds what earlier phases produced (the
    initial alphas, stage 1's result and, for ++, the allocation), so a run
    killed in stage 2 resumes there without redoing stage 1.
    """

    def __init__(self, work: WorkDir | None):
        self.work = work
        self.done: dict = {}  # JSON results of finished phases
        self.tensors: dict[str, torch.Tensor] = {}  # tensors of finished phases
        self.saved = work.load(CHECKPOINT) if work is not None else None
        if self.saved is not None:
            self.tensors = {
                k: v for k, v in self.saved[0].items() if k.startswith("stage1_raw.")
            }
            self.done = self.saved[1]["done"]

    def resume_for(self, phase: str) -> Resume | None:
        if self.saved is None or self.saved[1]["phase"] != phase:
            return None
        tensors, state = self.saved
        return Resume(
            loop=LoopState.from_json(state["loop"]),
            raw=_prefixed(tensors, "raw."),
            kept=_prefixed(tensors, "kept."),
            optimizer=_optimizer_from(tensors, state["optimizer"]),
            scheduler=state["scheduler"],
        )

    def hook(self, phase: str):
        if self.work is None or not is_main():
            return None  # rank 0 alone checkpoints

        def on_step(state, student, optimizer, scheduler, kept):
            tensors = dict(self.tensors)
            tensors.update({f"raw.{n}": w for n, w in student.raw.items()})
            tensors.update({f"kept.{n}": w for n, w in kept.items()})
            optimizer_meta = _optimizer_to(optimizer, tensors)
            save_state(
                self.work.file(CHECKPOINT),
                tensors,
                {
                    "phase": phase,
                    "done": self.done,
                    "loop": state.to_json(),
                    "optimizer": optimizer_meta,
                    "scheduler": scheduler.state_dict()
                    if scheduler is not None
                    else None,
                },
            )

        return on_step


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _optimizer_to(optimizer, tensors: dict[str, torch.Tensor]) -> dict | None:
    if optimizer is None:
        return None
    state_dict = optimizer.state_dict()
    meta = {"param_groups": state_dict["param_groups"], "state": {}}
    for index, values in state_dict["state"].items():
        meta["state"][str(index)] = sorted(values)
        for key, value in values.items():
            tensors[f"opt.{index}.{key}"] = torch.as_tensor(value)
    return meta


def _optimizer_from(tensors: dict[str, torch.Tensor], meta: dict | None) -> dict | None:
    if meta is None:
        return None
    return {
        "param_groups": meta["param_groups"],
        "state": {
            int(index): {key: tensors[f"opt.{index}.{key}"] for key in keys}
            for index, keys in meta["state"].items()
        },
    }


def main_first(action):
    """Run ``action`` on rank 0, then on the other ranks (which reuse its files)."""
    if is_main():
        result = action()
        barrier()
    else:
        barrier()
        result = action()
    return result


def resolve_precision(name: str, device: str) -> torch.dtype:
    """``auto``: float32 on the CPU, bfloat16 on a GPU that supports it, else float16."""
    if name != "auto":
        return getattr(torch, name)
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def calibrate(
    plan: ExpertMergePlan,
    checked: Checked,
    options: MergeOptions,
    lora_cache: str,
    work: WorkDir | None = None,
) -> tuple[CoefficientArtifact, dict]:
    """Teacher pass, initial-alpha search and coefficient training (resumable)."""
    settings = plan.calibration
    device = options.device or "cpu"
    quiet = options.quiet
    torch.manual_seed(settings.seed)
    clock = StageClock()
    trust = options.trust_remote_code
    names_of_experts = [e.name for e in plan.experts]
    merged_refs = main_first(
        lambda: [
            e.reference.merged(
                cache_dir=lora_cache,
                trust_remote_code=trust,
                lora_merge_dtype=options.lora_merge_dtype,
            )
            for e in plan.experts
        ]
    )
    base_dir = plan.base.merged(
        cache_dir=lora_cache, trust_remote_code=trust
    ).local_path(cache_dir=options.transformers_cache)
    expert_dirs = [
        r.local_path(cache_dir=options.transformers_cache) for r in merged_refs
    ]
    hidden_layers = checked.hidden_layers if settings.hidden_weight > 0 else []
    placement = Placement(
        device=device,
        dtype=resolve_precision(settings.precision, device),
        device_map=settings.device_map,
        gradient_checkpointing=settings.gradient_checkpointing,
        trust_remote_code=trust,
    )
    with clock.stage("teacher"):
        teacher_dir = work.file("teacher") if work is not None else None
        cache = TeacherCache.reopen(teacher_dir) if teacher_dir else None
        if cache is None:
            cache = run_teachers(
                expert_dirs,
                [
                    _tokenizer_candidates(d, e.reference, base_dir)
                    for d, e in zip(expert_dirs, plan.experts)
                ],
                checked.records,
                hidden_layers=hidden_layers,
                max_length=settings.max_length,
                max_new_tokens=settings.max_new_tokens,
                placement=placement,
                top_k=settings.teacher_top_k,
                directory=teacher_dir,
                quiet=quiet,
                expert_names=names_of_experts,
            )
    task_weights = [e.task_weight for e in plan.experts]
    checkpointer = Checkpointer(work)
    with clock.stage("student_setup"):
        model = placement.load(base_dir, student=True)
        params = checkpoint_parameters(
            model, CheckpointReader(base_dir, "the base model").files
        )
        names = select_weights(list(params), settings.exclude)
        if not names:
            raise ExpertMergingError(
                "calibration.exclude excludes every weight of the model; nothing to calibrate"
            )
        task_vectors = load_task_vectors(
            settings.task_vectors,
            names,
            params,
            base_dir,
            expert_dirs,
            names_of_experts,
        )
        init_values = checkpointer.done.get("init") or plan.init_values()
        student = Student(
            model,
            task_vectors,
            init_values or [settings.init_grid[0]] * len(plan.experts),
            activation=settings.activation,
            autocast=placement.autocast,
            parameters=params,
        )
    curve = checkpointer.done.get("init_curve", [])
    if init_values is None:
        with clock.stage("init_search"):
            best, curve = search_init(
                student, cache, settings, hidden_layers, task_weights, quiet
            )
        init_values = [best] * len(plan.experts)
        student.reset(init_values)
        LOG.info("init: auto chose alpha=%s", best)
    init_values = list(student.init)
    checkpointer.done.update({"init": init_values, "init_curve": curve})
    train = functools.partial(
        train_coefficients,
        student,
        cache,
        settings,
        hidden_layers,
        task_weights,
        quiet=quiet,
        expert_names=names_of_experts,
    )
    if "stage1" in checkpointer.done:
        stage1 = TrainHistory(**checkpointer.done["stage1"])
        stage1_raw = _prefixed(checkpointer.tensors, "stage1_raw.")
        with torch.no_grad():
            for name, w in student.raw.items():
                w.copy_(stage1_raw[name])
        student.load()
    else:
        with clock.stage("stage1"):
            stage1 = train(
                desc="Stage 1",
                resume=checkpointer.resume_for("stage1"),
                on_step=checkpointer.hook("stage1"),
            )
        stage1_raw = {name: w.detach().clone() for name, w in student.raw.items()}
        checkpointer.done["stage1"] = dict(stage1.__dict__)
        checkpointer.tensors = {f"stage1_raw.{n}": t for n, t in stage1_raw.items()}
    alphas = student.all_alphas()
    losses = {
        "task_arithmetic_init": stage1.alignment[0],
        "stage1": stage1.kept_alignment,
    }
    stages = {"stage1": _history_report(stage1)}
    allocation = None
    if plan.method == "expert_merging_pp":
        with clock.stage("stage2"):
            allocation = prepare_stage2(student, alphas, stage1_raw, settings)
            stage2 = train_coefficients(
                student,
                cache,
                settings.stage2(),
                hidden_layers,
                task_weights,
                quiet=quiet,
                expert_names=names_of_experts,
                desc="Stage 2",
                resume=checkpointer.resume_for("stage2"),
                on_step=checkpointer.hook("stage2"),
            )
        alphas = student.all_alphas()
        losses["stage2"] = stage2.kept_alignment
        stages["stage2"] = _history_report(stage2)
    _, final_expert = alignment_loss(
        student, cache, settings, hidden_layers, task_weights
    )
    artifact = CoefficientArtifact(
        coefficients=alphas,
        method=plan.method,
        base=str(plan.base),
        experts=names_of_experts,
        init=init_values,
    )
    low, high = settings.sane_range
    outside = {
        name: [
            [k, s, float(a[k, s])]
            for k, s in ((a < low) | (a > high)).nonzero().tolist()
        ]
        for name, a in alphas.items()
        if bool(((a < low) | (a > high)).any())
    }
    if outside:
        LOG.warning(
            "%d weights have coefficients outside calibration.sane_range %s: %s",
            len(outside),
            settings.sane_range,
            ", ".join(sorted(outside)[:5]),
        )
    report = {
        "format": "mergekit-expert-report/1",
        "method": plan.method,
        "base": str(plan.base),
        "experts": names_of_experts,
        "task_weights": task_weights,
        "init": init_values,
        "init_curve": curve,
        "samples_per_expert": [len(r) for r in checked.records],
        "hidden_layers": hidden_layers,
        "calibration": settings.model_dump(),
        "device": device,
        "world_size": world_size(),
        "precision": str(placement.dtype).replace("torch.", ""),
        "task_vectors": "streamed"
        if isinstance(task_vectors, StreamedTaskVectors)
        else "resident",
        "loss": losses,
        "resumed": checkpointer.saved is not None,
        "expert_loss_final": final_expert,
        **stages,
        "pseudo_labels": gather_lists(cache.pseudo_labels),
        "truncated_samples": int(
            all_reduce_sum(
                [torch.tensor(float(sum(s.truncated for s in cache.samples.values())))]
            )[0]
        ),
        "coefficients_outside_sane_range": outside,
        "mean_alpha": _mean_alpha(alphas, len(plan.experts)),
        "coefficients": {name: a.tolist() for name, a in alphas.items()},
        "stages": clock.stages,
        "versions": _versions(),
    }
    if allocation is not None:
        report["allocation"] = {
            "budget": allocation.budget,
            "kappa": settings.kappa,
            "total_chunks": sum(allocation.chunks.values()),
            "importance": allocation.importance,
            "chunks": allocation.chunks,
        }
    del student, model, task_vectors, cache
    return artifact, report


def prepare_stage2(student, stage1_alphas, stage1_raw, settings) -> Allocation:
    """Importance-guided chunking of the student for stage 2 (same teacher cache)."""
    vectors = student.task_vectors
    numels = {name: vectors.numel(name) for name in vectors.names}
    importance = layer_importance(stage1_alphas, vectors.mean_abs(), numels)
    allocation = allocate_chunks(importance, numels, settings.budget, settings.kappa)
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


def _history_report(history) -> dict:
    return {
        "epoch_loss": history.epoch_loss,
        "epoch_expert_loss": history.epoch_expert_loss,
        "alignment_loss": history.alignment,
        "objective": history.objective,
        "kept_epoch": history.kept_epoch,
        "optimizer_steps": history.steps,
        "step_seconds": history.step_seconds,
        "stopped_early": history.stopped_early,
    }


def _mean_alpha(alphas, experts: int) -> list[float]:
    return [
        float(torch.cat([a[k] for a in alphas.values()]).mean()) for k in range(experts)
    ]


def _versions() -> dict:
    import mergekit
    import transformers

    from . import __version__

    return {
        "mergekit_expert": __version__,
        "mergekit": getattr(mergekit, "__version__", _dist_version("mergekit")),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def run_expert_merge(
    document: dict,
    out_path: str,
    options: MergeOptions,
    *,
    config_source: str | None = None,
    config_file: str | None = None,
    coefficients: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> None:
    """The whole job: validate, calibrate (unless given coefficients), merge, report.

    The output is staged in ``OUT.partial`` and moved into place when complete;
    a calibration that fails or is interrupted keeps its checkpoint there, and
    running the same command again resumes from it.
    """
    plan = parse_plan(document)
    checked = preflight(plan, options, coefficients, allow_pickle, config_file)
    check_output_location(out_path, checked.inputs)
    check_replaceable(out_path, overwrite)
    references = [plan.base] + [e.reference for e in plan.experts]
    model_paths = sorted(
        {
            p
            for r in references
            for p in (r.model.path, r.lora.path if r.lora else None)
            if p and os.path.exists(p)
        }
    )
    data_paths = (
        [e.calibration for e in plan.experts] if checked.artifact is None else []
    )
    work = WorkDir(out_path, fingerprint(document, model_paths, data_paths))
    # Join torchrun's process group first: only then does is_main() know the rank.
    options = options.model_copy(
        update={"device": setup_distributed(options.device or "cpu")}
    )
    if is_main():
        work.open()  # rank 0 alone prepares and locks OUT.partial ...
    barrier()  # ... and the other ranks find it ready
    lora_cache = options.lora_merge_cache or work.file("lora")
    merge_options = options.model_copy(update={"lora_merge_cache": lora_cache})
    try:
        report = None
        if checked.artifact is not None:
            artifact_file = coefficients or plan.coefficients
            artifact = checked.artifact
        else:
            artifact, report = calibrate(plan, checked, merge_options, lora_cache, work)
            if not is_main():
                return  # rank 0 writes the artifact, the model and the report
            artifact_file = work.file(ARTIFACT_NAME)
            artifact.save(artifact_file)
        merge_config = copy.deepcopy(plan.merge_config)
        merge_config.parameters = {"coefficients": os.path.abspath(artifact_file)}
        clock = StageClock()
        with clock.stage("write"):
            run_merge(
                merge_config,
                work.staging,
                options=merge_options,
                config_source=config_source,
            )
        _finish(work.staging, artifact, artifact_file, report, clock, options)
        work.publish()
    except BaseException:
        if is_main():
            work.discard_staging()
            if checked.artifact is not None or not os.path.exists(
                work.file(CHECKPOINT)
            ):
                work.remove()
            else:
                LOG.error(
                    "the calibration state is kept in %s: run the same command again "
                    "to resume; %s was not changed",
                    work.path,
                    out_path,
                )
        raise
    finally:
        work.close()


def run_plain_merge(
    document: dict,
    out_path: str,
    options: MergeOptions,
    *,
    config_source: str,
    config_file: str,
    overwrite: bool = False,
) -> None:
    """Any other mergekit method, under the same output rules as expert merging:
    validated inputs, a locked ``OUT.partial``, an atomic replace at the end."""
    try:
        merge_config = MergeConfiguration.model_validate(document)
    except (ValidationError, ValueError, RuntimeError) as error:
        raise ExpertMergingError(f"invalid mergekit configuration: {error}") from None
    check_device(options.device)
    named = [(r, f"model {r}") for r in merge_config.referenced_models()]
    inputs = model_inputs(resolve_models(named, allow_pickle=None))
    inputs += option_inputs(options)
    inputs.append(InputPath(config_file, "the config file"))
    check_output_location(out_path, inputs)
    check_replaceable(out_path, overwrite)
    work = WorkDir(out_path, f"mergekit:{merge_config.merge_method}")
    work.open()
    try:
        run_merge(
            merge_config, work.staging, options=options, config_source=config_source
        )
        work.publish()
    except BaseException:
        work.remove()
        raise
    finally:
        work.close()


def _finish(out_path, artifact, artifact_file, report, clock, options) -> None:
    """Artifact, report, heatmap and model-card section into OUT/expert_merging."""
    folder = os.path.join(out_path, ARTIFACT_DIR)
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, ARTIFACT_NAME)
    if os.path.abspath(artifact_file) != os.path.abspath(target):
        shutil.copyfile(artifact_file, target)
    if report is None:
        report = {
            "format": "mergekit-expert-report/1",
            "method": artifact.method,
            "base": artifact.base,
            "experts": list(artifact.experts),
            "init": list(artifact.init),
            "coefficients_from": os.path.abspath(artifact_file),
            "samples_per_expert": ["-"] * len(artifact.experts),
            "mean_alpha": _mean_alpha(artifact.coefficients, len(artifact.experts)),
            "coefficients": {n: a.tolist() for n, a in artifact.coefficients.items()},
            "stages": {},
        }
    report["stages"].update(clock.stages)
    pretty = (
        "Expert Merging++"
        if artifact.method == "expert_merging_pp"
        else "Expert Merging"
    )
    report["method_pretty_name"] = pretty
    write_json(os.path.join(folder, "report.json"), report)
    plot_coefficients(
        os.path.join(folder, "coefficients.png"),
        artifact.coefficients,
        artifact.experts,
        f"{pretty}: learned coefficients",
        chunks=_chunk_counts(artifact, report),
    )
    card = os.path.join(out_path, "README.md")
    if options.write_model_card and os.path.exists(card):
        with open(card, "a", encoding="utf-8") as handle:
            handle.write(card_section(report))


def _chunk_counts(artifact: CoefficientArtifact, report: dict) -> dict[str, int] | None:
    """Chunk allocation of an Expert Merging++ merge (0 = fixed), else None."""
    if artifact.method != "expert_merging_pp":
        return None
    if "allocation" in report:
        return report["allocation"]["chunks"]
    return {name: matrix.shape[1] for name, matrix in artifact.coefficients.items()}
