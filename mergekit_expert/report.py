"""What a merge leaves in ``OUT/expert_merging/``: the artifact, report.json
(built in one place), the heatmap and the model card's section (``card``)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .card import (
    card_section,
    outcome_heading,
    plot_coefficients,
    short_labels,
    without_local_paths,
)
from .coefficients import ARTIFACT_DIR, ARTIFACT_NAME, CoefficientArtifact

if TYPE_CHECKING:
    from .calibrate import CalibrationResult
    from .train import TrainHistory

LOG = logging.getLogger(__name__)
CALIBRATION_CONFIG = "calibration_config.yml"
PRETTY_NAMES = {
    "expert_merging": "Expert Merging",
    "expert_merging_pp": "Expert Merging++",
}


def build_report(
    artifact: CoefficientArtifact,
    calibration: CalibrationResult | None,
    artifact_file: str,
    stages: Mapping[str, Mapping[str, float]],
) -> dict[str, Any]:
    """report.json: the calibration's measurements, or (merging from an
    artifact) where the coefficients came from."""
    alphas = artifact.calibrated() or artifact.coefficients
    experts = len(artifact.experts)
    report: dict[str, Any] = {
        "format": "mergekit-expert-report/1",
        "method": artifact.method,
        "method_pretty_name": PRETTY_NAMES[artifact.method],
        "base": artifact.base,
        "experts": list(artifact.experts),
        "init": list(artifact.init),
    }
    if calibration is None:
        report["coefficients_from"] = os.path.abspath(artifact_file)
        report["samples_per_expert"] = ["-"] * experts
    else:
        report.update(_calibration_report(calibration))
    per_expert = [torch.cat([a[k] for a in alphas.values()]) for k in range(experts)]
    report["mean_alpha"] = [float(values.mean()) for values in per_expert]
    report["alpha_range"] = [
        [float(values.min()), float(values.max())] for values in per_expert
    ]
    report["coefficients"] = {
        name: a.tolist() for name, a in artifact.coefficients.items()
    }
    report["at_init"] = list(artifact.at_init)
    report["stages"] = {**(calibration.stages if calibration else {}), **stages}
    if calibration is not None:
        report["versions"] = _versions()
    return report


def _calibration_report(result: CalibrationResult) -> dict[str, Any]:
    from .distributed import world_size

    settings = result.settings
    losses = {
        "task_arithmetic_init": result.stage1.alignment[0],
        "stage1": result.stage1.kept_alignment,
    }
    histories = {"stage1": _history(result.stage1)}
    if result.stage2 is not None:
        losses["stage2"] = result.stage2.kept_alignment
        histories["stage2"] = _history(result.stage2)
    report: dict[str, Any] = {
        "task_weights": result.task_weights,
        "init_curve": result.init_curve,
        "init_selection": result.init_selection,
        "reg_weight_selection": result.reg_selection,
        "stage2_check": result.stage2_check,
        "samples_per_expert": result.samples_per_expert,
        "hidden_layers": result.hidden_layers,
        "calibration": settings.model_dump(),
        "device": result.device,
        "world_size": world_size(),
        "precision": result.precision,
        "task_vectors": result.task_vectors,
        "loss": losses,
        "resumed": result.resumed,
        "expert_loss_final": result.expert_loss_final,
        "alignment_terms": result.alignment_terms,
        **histories,
        "pseudo_labels": result.pseudo_labels,
        "truncated_samples": result.truncated_samples,
        "coefficients_outside_sane_range": outside_range(
            result.artifact.coefficients, settings.sane_range
        ),
        "outcome": outcome(result),
    }
    if result.allocation is not None:
        allocation = result.allocation
        report["allocation"] = {
            "budget": allocation.budget,
            "kappa": settings.kappa,
            "total_chunks": sum(allocation.chunks.values()),
            "importance": allocation.importance,
            "chunks": allocation.chunks,
        }
    return report


# A run that moved no coefficient by more than this wrote, for any use of the
# merge, task arithmetic at the initial alpha. In the quality benchmark's
# results, 4 of 345 calibrated runs that moved at all moved by at most 0.0005
# (their alignment fell by 0.002 % at most) and every other by at least 0.088.
BARELY_MOVED = 0.01


def outcome(result: CalibrationResult) -> dict[str, Any]:
    """Whether calibration moved the coefficients from their start, and if not
    (or by less than ``BARELY_MOVED``), why and which key to change."""
    init = torch.tensor(result.artifact.init, dtype=torch.float32)[:, None]
    change = max(
        (float((a - init).abs().max()) for a in result.artifact.coefficients.values()),
        default=0.0,
    )
    moved = change > 1e-6
    message = None
    if not moved:
        message = why_unmoved(result)
    elif change < BARELY_MOVED:
        message = why_barely_moved(result, change)
    found = {"moved": moved, "max_change": change, "message": message}
    if message is not None:
        LOG.warning("%s", outcome_warning(found))
    return found


def outcome_warning(found: Mapping[str, Any]) -> str | None:
    """The warning a run's outcome calls for, or None."""
    heading = outcome_heading(found)
    return f"{heading}: {found['message']}" if heading else None


def why_barely_moved(result: CalibrationResult, change: float) -> str:
    """Why the coefficients moved by only ``change``, and which key to change."""
    gamma = float(result.settings.reg_weight)  # the number used (auto: the chosen)
    chosen = (
        " (reg_weight: auto kept it: the lower weights raised some expert's "
        "held-out loss, see reg_weight_selection in report.json)"
        if result.reg_selection
        and any(result.reg_selection.get("raised_experts") or [])
        else ""
    )
    return (
        f"no coefficient moved by more than {change:.2g}, so the merge is task "
        "arithmetic at the initial alpha to within that: the regularizer "
        f"(reg_weight {gamma:g}){chosen} outweighs nearly all of the alignment "
        "gain. To let calibration move, lower calibration.reg_weight."
    )


def why_unmoved(result: CalibrationResult) -> str:
    settings, stage1 = result.settings, result.stage1
    start = "the merge is task arithmetic at the initial alpha"
    if settings.optimizer == "prox" and stage1.start_ratio < 1:
        gamma = float(settings.reg_weight)  # the number used (auto: the chosen)
        return (
            f"{start}: at the start no coefficient's alignment gradient (largest "
            f"{stage1.start_gradient:.3g}) outweighs the regularizer's pull "
            f"(reg_weight / weights per expert = {stage1.start_pull:.3g}), so the "
            "start is the optimum of the objective. To let calibration move, lower "
            f"calibration.reg_weight below {gamma * stage1.start_ratio:.3g}"
            + (
                " or set alignment_scale: base (scale-free alignment)."
                if settings.alignment_scale == "absolute"
                else "."
            )
        )
    if settings.optimizer == "prox":
        return (
            f"{start}: no step lowered the objective (every trial was rejected); "
            "lower calibration.lr (the first step size) or calibration.reg_weight."
        )
    return (
        f"{start}: no epoch ended with the objective below its start (adamw at lr "
        f"{settings.step} moves every coefficient by about lr at once); use "
        "optimizer: prox, or lower calibration.lr or calibration.reg_weight."
    )


def outside_range(
    alphas: Mapping[str, torch.Tensor], sane_range: tuple[float, float]
) -> dict[str, list]:
    """[expert, chunk, alpha] of every coefficient outside the sane range, by weight."""
    low, high = sane_range
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
            list(sane_range),
            ", ".join(sorted(outside)[:5]),
        )
    return outside


def _history(history: TrainHistory) -> dict[str, Any]:
    return {
        "epoch_loss": history.epoch_loss,
        "epoch_expert_loss": history.epoch_expert_loss,
        "alignment_loss": history.alignment,
        "objective": history.objective,
        "kept_epoch": history.kept_epoch,
        "optimizer_steps": history.steps,
        "step_seconds": history.step_seconds,
        "stopped_early": history.stopped_early,
        "evaluations": history.evaluations,
        "start_gradient": history.start_gradient,
        "start_pull": history.start_pull,
        "start_ratio": history.start_ratio,
        "pass_seconds": history.pass_seconds,
        "bytes_read": history.bytes_read,
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import mergekit
    import transformers

    from . import __version__

    return {
        "mergekit_expert": __version__,
        "mergekit": getattr(mergekit, "__version__", None) or version("mergekit"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def write_outputs(
    out_path: str,
    artifact: CoefficientArtifact,
    artifact_file: str,
    report: Mapping[str, Any],
    model_card: bool,
) -> None:
    """Artifact, report, heatmap and model-card section into OUT/expert_merging."""
    folder = os.path.join(out_path, ARTIFACT_DIR)
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, ARTIFACT_NAME)
    if os.path.abspath(artifact_file) != os.path.abspath(target):
        shutil.copyfile(artifact_file, target)
    write_json(os.path.join(folder, "report.json"), report)
    calibrated = artifact.calibrated()
    chunks = None
    check = report.get("stage2_check") or {}
    if artifact.method == "expert_merging_pp" and check.get("kept", True):
        chunks = report.get("allocation", {}).get("chunks") or {
            name: matrix.shape[1] for name, matrix in calibrated.items()
        }
    plot_coefficients(
        os.path.join(folder, "coefficients.png"),
        calibrated,
        short_labels(artifact.experts),
        f"{report['method_pretty_name']}: learned coefficients",
        chunks=chunks,
    )
    card = os.path.join(out_path, "README.md")
    if model_card and os.path.exists(card):
        with open(card, encoding="utf-8") as handle:
            text = handle.read() + card_section(report)
        with open(card, "w", encoding="utf-8") as handle:
            handle.write(
                without_local_paths(text, [report["base"], *report["experts"]])
            )


def save_calibration_config(out_path: str, config_source: str) -> None:
    """The config the coefficients were calibrated with, kept beside them."""
    path = os.path.join(out_path, ARTIFACT_DIR, CALIBRATION_CONFIG)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(config_source)


def summary_line(out_path: str, report: Mapping[str, Any]) -> str:
    """One line for the end of a run: where, what, how the objective moved, how long."""
    wall = sum(stage.get("wall_s", 0.0) for stage in report["stages"].values())
    parts = [f"wrote {report['method_pretty_name']} merge to {out_path}"]
    loss = report.get("loss")
    if loss:
        parts.append(
            "alignment loss "
            + " -> ".join(f"{value:.4g} ({key})" for key, value in loss.items())
        )
    else:
        parts.append(f"coefficients from {report.get('coefficients_from')}")
    selection = report.get("reg_weight_selection")
    if selection:
        parts.append(f"reg_weight {selection['reg_weight']:g} (auto)")
    check = report.get("stage2_check")
    if check and not check["kept"]:
        parts.append("stage 2 not kept (held-out check)")
    parts.append(f"{wall:.1f} s")
    line = "; ".join(parts)
    warning = outcome_warning(report.get("outcome") or {})
    if warning:
        line += f"\nWarning: {warning}"
    return line


def finite_json(value):
    """``value`` with every NaN or infinity replaced by None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_json(path: str, report: Mapping) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(finite_json(report), handle, indent=2, allow_nan=False)
