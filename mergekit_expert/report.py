"""report.json, the coefficient heatmap and the model-card section."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence

import torch

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
