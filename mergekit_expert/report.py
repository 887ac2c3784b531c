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
    alphas = artifact.coefficients
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
    report["coefficients"] = {name: a.tolist() for name, a in alphas.items()}
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
    chunks = None
    if artifact.method == "expert_merging_pp":
        chunks = report.get("allocation", {}).get("chunks") or {
            name: matrix.shape[1] for name, matrix in artifact.coefficients.items()
        }
    plot_coefficients(
        os.path.join(folder, "coefficients.png"),
        artifact.coefficients,
        artifact.experts,
        f"{report['method_pretty_name']}: learned coefficients",
        chunks=chunks,
    )
    card = os.path.join(out_path, "README.md")
    if model_card and os.path.exists(card):
        with open(card, "a", encoding="utf-8") as handle:
            handle.write(card_section(report))


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

    short = [os.path.basename(e.rstrip("/")) or e for e in experts]
    alpha_cells, chunk_cells = {}, {}
    for name, matrix in coefficients.items():
        block, projection = _block_and_projection(name)
        if block is None:
            continue
        label = projection.split(".")[-1]
        for k in range(matrix.shape[0]):
            alpha_cells[(block, f"{label}\n{short[k]}")] = float(
                matrix[k].float().mean()
            )
        if chunks is not None:
            chunk_cells[(block, label)] = float(chunks.get(name, matrix.shape[1]))
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
        "| expert | initial alpha | mean learned alpha | calibration samples |",
        "|---|---|---|---|",
    ]
    for k, expert in enumerate(experts):
        lines.append(
            f"| {expert} | {init[k]:.3f} | {report['mean_alpha'][k]:.3f} | "
            f"{report['samples_per_expert'][k]} |"
        )
    loss = report.get("loss", {})
    if loss:
        lines += [
            "",
            "Calibration alignment loss: "
            + ", ".join(f"{key} {value:.4f}" for key, value in loss.items())
            + ".",
        ]
    lines += [
        "",
        "Coefficients: `expert_merging/coefficients.safetensors` (one [experts, "
        "chunks] float32 tensor per weight; weights not listed are the base's). "
        "Details: `expert_merging/report.json`.",
        "",
        "![learned coefficients](expert_merging/coefficients.png)",
        "",
    ]
    return "\n".join(lines)
