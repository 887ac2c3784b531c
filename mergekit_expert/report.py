"""What a merge leaves in ``OUT/expert_merging/``: the artifact, report.json,
the coefficient heatmap, and the model card's section."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

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
    report["mean_alpha"] = [
        float(torch.cat([a[k] for a in alphas.values()]).mean()) for k in range(experts)
    ]
    report["alpha_range"] = [
        [
            float(torch.cat([a[k].reshape(-1) for a in alphas.values()]).min()),
            float(torch.cat([a[k].reshape(-1) for a in alphas.values()]).max()),
        ]
        for k in range(experts)
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


def outcome(result: CalibrationResult) -> dict[str, Any]:
    """Whether calibration moved the coefficients from their start, and if not,
    why and which key to change."""
    init = torch.tensor(result.artifact.init, dtype=torch.float32)[:, None]
    change = max(
        (float((a - init).abs().max()) for a in result.artifact.coefficients.values()),
        default=0.0,
    )
    moved = change > 1e-6
    message = None if moved else why_unmoved(result)
    if message is not None:
        LOG.warning("calibration ended at its start: %s", message)
    return {"moved": moved, "max_change": change, "message": message}


def why_unmoved(result: CalibrationResult) -> str:
    settings, stage1 = result.settings, result.stage1
    start = "the merge is task arithmetic at the initial alpha"
    if settings.optimizer == "prox" and stage1.start_ratio < 1:
        gamma = settings.reg_weight
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
    options: Any,
) -> None:
    """Artifact, report, heatmap and model-card section into OUT/expert_merging."""
    folder = os.path.join(out_path, ARTIFACT_DIR)
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, ARTIFACT_NAME)
    if os.path.abspath(artifact_file) != os.path.abspath(target):
        shutil.copyfile(artifact_file, target)
    write_json(os.path.join(folder, "report.json"), report)
    chunks = None
    if artifact.method == "expert_merging_pp":
        chunks = report.get("allocation", {}).get("chunks") or {
            name: matrix.shape[1] for name, matrix in artifact.calibrated().items()
        }
    plot_coefficients(
        os.path.join(folder, "coefficients.png"),
        artifact.calibrated(),
        short_labels(artifact.experts),
        f"{report['method_pretty_name']}: learned coefficients",
        chunks=chunks,
    )
    card = os.path.join(out_path, "README.md")
    if options.write_model_card and os.path.exists(card):
        with open(card, encoding="utf-8") as handle:
            text = handle.read() + card_section(report)
        with open(card, "w", encoding="utf-8") as handle:
            handle.write(
                without_local_paths(text, [report["base"], *report["experts"]])
            )


def reproduce_config(document: Mapping[str, Any]) -> str:
    """The merge config that reproduces this merge from its artifact alone: the
    config as written, without calibration data, reading the coefficients the
    output holds (a path relative to the model directory)."""
    reproduce = {k: v for k, v in document.items() if k != "calibration"}
    reproduce["parameters"] = {
        **(document.get("parameters") or {}),
        "coefficients": f"{ARTIFACT_DIR}/{ARTIFACT_NAME}",
    }
    models = []
    for entry in document.get("models") or []:
        entry = dict(entry)
        parameters = {
            k: v
            for k, v in (entry.get("parameters") or {}).items()
            if k not in ("calibration", "task_weight")
        }
        entry.pop("parameters", None)
        if parameters:
            entry["parameters"] = parameters
        models.append(entry)
    reproduce["models"] = models
    import yaml

    return yaml.safe_dump(reproduce, sort_keys=False)


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
    parts.append(f"{wall:.1f} s")
    line = "; ".join(parts)
    outcome = report.get("outcome") or {}
    if outcome.get("message"):
        line += f"\nWarning: calibration ended at its start: {outcome['message']}"
    return line


def short_labels(references: Sequence[str]) -> list[str]:
    """Distinct short names: the fewest trailing path parts that tell each apart
    (``math/checkpoint-500`` and ``code/checkpoint-500``, not twice the last)."""
    parts = [
        [p for p in ref.replace("\\", "/").rstrip("/").split("/") if p] or [ref]
        for ref in references
    ]
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) or all(depth >= len(p) for p in parts):
            return labels
        depth += 1


def without_local_paths(text: str, references: Sequence[str]) -> str:
    """``text`` with every absolute local path among ``references`` (and their
    ``base+adapter`` parts) replaced by its short name: a published card names
    models, not the directories of the machine that merged them."""
    paths = {
        part
        for ref in references
        for part in str(ref).split("+")
        if os.path.isabs(part)
    }
    ordered = sorted(paths, key=len, reverse=True)
    for path, label in zip(ordered, short_labels(ordered)):
        text = text.replace(path, label)
    return text


BLOCK_PATTERN = re.compile(r"layers\.(\d+)\.(.+?)(?:\.weight)?$")


def _block_and_projection(name: str) -> tuple[int | None, str]:
    match = BLOCK_PATTERN.search(name)
    if match is None:
        return None, name
    return int(match.group(1)), match.group(2)


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


def _grid(
    values: Mapping[tuple[int, str], float],
) -> tuple[list[int], list[str], torch.Tensor]:
    """Rows (blocks), columns and a NaN-padded grid from {(block, column): value}."""
    rows = sorted({block for block, _ in values})
    columns: list[str] = []
    for _, column in values:
        if column not in columns:
            columns.append(column)
    grid = torch.full((max(len(rows), 1), max(len(columns), 1)), float("nan"))
    for (block, column), value in values.items():
        grid[rows.index(block), columns.index(column)] = value
    return rows, columns, grid


def heatmap_cells(
    coefficients: Mapping[str, torch.Tensor],
    experts: Sequence[str],
    chunks: Mapping[str, int] | None = None,
) -> tuple[dict[tuple[int, str], float], dict[tuple[int, str], float]]:
    """{(block, "projection\\nexpert"): mean alpha} and {(block, projection):
    chunk count}; ``experts`` are the column labels, distinct per expert."""
    alpha_cells, chunk_cells = {}, {}
    for name, matrix in coefficients.items():
        block, projection = _block_and_projection(name)
        if block is None:
            continue
        label = projection.split(".")[-1]
        for k in range(matrix.shape[0]):
            alpha_cells[(block, f"{label}\n{experts[k]}")] = float(
                matrix[k].float().mean()
            )
        if chunks is not None:
            chunk_cells[(block, label)] = float(chunks.get(name, matrix.shape[1]))
    return alpha_cells, chunk_cells


def plot_coefficients(
    path: str,
    coefficients: Mapping[str, torch.Tensor],
    experts: Sequence[str],
    title: str,
    chunks: Mapping[str, int] | None = None,
) -> None:
    """Heatmap of mean alpha per weight (rows blocks, columns projection x expert),
    and for Expert Merging++ a second panel with the chunk allocation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alpha_cells, chunk_cells = heatmap_cells(coefficients, experts, chunks)
    panels = [(alpha_cells, "alpha (mean over chunks)", title, "viridis")]
    if chunks is not None:
        panels.append((chunk_cells, "chunks (0 = fixed)", "Chunk allocation", "magma"))
    rows, columns, _ = _grid(alpha_cells) if alpha_cells else ([], [], None)
    width = max(6.0, 0.35 * len(columns) + 3) + (4.0 if chunks is not None else 0.0)
    height = max(3.0, 0.3 * len(rows) + 2)
    ratios = [max(len(columns), 1)] + (
        [max(len(columns), 1) // 2 + 2] if chunks is not None else []
    )
    figure, axes = plt.subplots(
        1,
        len(panels),
        figsize=(width, height),
        squeeze=False,
        gridspec_kw={"width_ratios": ratios},
    )
    for axis, (cells, label, panel_title, cmap) in zip(axes[0], panels):
        rows, columns, grid = _grid(cells) if cells else ([], [], torch.zeros(1, 1))
        image = axis.imshow(grid.numpy(), aspect="auto", cmap=cmap)
        axis.set_yticks(range(len(rows)), [f"block {b}" for b in rows])
        axis.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
        axis.set_title(panel_title)
        figure.colorbar(image, ax=axis, label=label)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def card_section(report: Mapping) -> str:
    """Markdown appended to the model card mergekit writes."""
    experts = report["experts"]
    labels = short_labels(experts)
    init = report["init"]
    lines = [
        "",
        f"## {report['method_pretty_name']} (mergekit-expert)",
        "",
        "The task-vector coefficients of this merge were learned by aligning the "
        "merged model's logits and hidden states with each expert on a few "
        "unlabeled calibration samples of its own domain "
        "([Expert Merging](https://arxiv.org/abs/2509.25712)).",
        "",
        "| expert | initial alpha | learned alpha: min / mean / max | calibration samples |",
        "|---|---|---|---|",
    ]
    for k, label in enumerate(labels):
        low, high = report["alpha_range"][k]
        lines.append(
            f"| {label} | {init[k]:.3f} | {low:.3f} / {report['mean_alpha'][k]:.3f} / "
            f"{high:.3f} | {report['samples_per_expert'][k]} |"
        )
    lines += ["", loss_sentence(report), ""]
    lines += [
        "![learned coefficients](expert_merging/coefficients.png)",
        "",
        "### Reproduce",
        "",
        "`mergekit_config.yml` reproduces this merge from its coefficients "
        "(`expert_merging/coefficients.safetensors`, one [experts, chunks] float32 "
        "tensor per weight; weights not listed are the base's), without the "
        "calibration data:",
        "",
        "```",
        "pip install mergekit-expert",
        "mergekit-expert mergekit_config.yml ./merged   # or mergekit-yaml, from this folder",
        "```",
        "",
        "The coefficients path is relative to the config's folder. "
        + (
            "`mergekit-expert export expert_merging/coefficients.safetensors -o "
            "task_arithmetic.yml` writes an equivalent stock mergekit config "
            "(no plugin needed). "
            if report["method"] == "expert_merging"
            else ""
        )
        + "The calibration settings are in `expert_merging/calibration_config.yml`, "
        "the full record in `expert_merging/report.json`.",
        "",
    ]
    return "\n".join(lines)


def loss_sentence(report: Mapping) -> str:
    """How calibration changed the alignment loss, in words."""
    loss = report.get("loss")
    if not loss:
        return (
            "These coefficients were read from an existing artifact "
            "(no calibration in this run)."
        )
    start = loss["task_arithmetic_init"]
    alpha = ", ".join(f"{a:.2f}" for a in sorted(set(report["init"])))
    words = [
        f"Calibration alignment loss: {start:.4f} for task arithmetic at alpha = {alpha}"
    ]
    for key, label in (("stage1", "stage 1"), ("stage2", "stage 2")):
        if key in loss:
            change = 100 * (loss[key] - start) / start if start else 0.0
            words.append(f"{loss[key]:.4f} after {label} ({change:+.1f} %)")
    sentence = ", ".join(words[:1]) + (", " if len(words) > 1 else "")
    sentence += ", ".join(words[1:]) + "."
    outcome = report.get("outcome", {})
    if outcome and not outcome.get("moved", True):
        sentence += f" **Calibration ended at its start:** {outcome['message']}"
    return sentence
