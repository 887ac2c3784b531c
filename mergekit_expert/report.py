"""report.json, the coefficient heatmap and the model-card section."""

from __future__ import annotations

import json
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


def write_json(path: str, report: Mapping) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)


def plot_coefficients(
    path: str,
    coefficients: Mapping[str, torch.Tensor],
    experts: Sequence[str],
    title: str,
) -> None:
    """Heatmap of mean alpha per weight: rows blocks, columns projection x expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells: dict[tuple[int, str, int], float] = {}
    projections: list[str] = []
    blocks: set[int] = set()
    for name, matrix in coefficients.items():
        block, projection = _block_and_projection(name)
        if block is None:
            continue
        blocks.add(block)
        if projection not in projections:
            projections.append(projection)
        for k in range(matrix.shape[0]):
            cells[(block, projection, k)] = float(matrix[k].float().mean())
    rows = sorted(blocks)
    columns = [(p, k) for p in projections for k in range(len(experts))]
    grid = torch.full((max(len(rows), 1), max(len(columns), 1)), float("nan"))
    for r, block in enumerate(rows):
        for c, (projection, k) in enumerate(columns):
            if (block, projection, k) in cells:
                grid[r, c] = cells[(block, projection, k)]
    width = max(6.0, 0.35 * len(columns) + 3)
    height = max(3.0, 0.3 * len(rows) + 2)
    figure, axis = plt.subplots(figsize=(width, height))
    image = axis.imshow(grid.numpy(), aspect="auto", cmap="viridis")
    axis.set_yticks(range(len(rows)), [f"block {b}" for b in rows])
    short = [os.path.basename(e.rstrip("/")) or e for e in experts]
    axis.set_xticks(
        range(len(columns)),
        [f"{p.split('.')[-1]}\n{short[k]}" for p, k in columns],
        rotation=90,
        fontsize=7,
    )
    axis.set_title(title)
    figure.colorbar(image, ax=axis, label="alpha (mean over chunks)")
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
