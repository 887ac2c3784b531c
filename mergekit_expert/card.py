"""What a published merge says about itself: the model card's section, the
coefficient heatmap, short model labels without local paths, and the config
that reproduces the merge from its artifact."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .coefficients import ARTIFACT_DIR, ARTIFACT_NAME


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
    initial = report.get("init_selection")
    if initial and initial.get("held_out_alignment"):
        fits = ", ".join(
            f"{held:.4f} from {alpha:g}"
            for alpha, held in zip(initial["candidates"], initial["held_out_alignment"])
        )
        sentence += (
            f" The initial alpha (init: auto) was {initial['alpha']:g}: calibrated on "
            "half of each expert's samples from task arithmetic's best-aligned value "
            f"and from the next larger one, the other half's alignment loss was {fits} "
            "(task arithmetic's best-aligned value is kept unless the larger "
            "start's is lower by more than one standard error)."
        )
    elif initial and initial.get("note"):
        sentence += f" init: auto: {initial['note']}."
    selection = report.get("reg_weight_selection")
    if selection and selection.get("held_out_alignment"):
        limit = f"{selection.get('rise_limit', 2):g} standard errors"
        if selection.get("trade_share"):
            limit += f" and {selection['trade_share']:g} of the total's fall"
        sentence += (
            f" The regularizer's weight (reg_weight: auto) was {selection['reg_weight']:g}, "
            "the largest of "
            + ", ".join(f"{g:g}" for g in selection["grid"])
            + " whose alignment loss on held-out calibration samples was within one "
            "standard error of the lowest, among the weights that raise no expert's "
            f"held-out loss by more than {limit}."
        )
        left_out = [
            (gamma, who)
            for gamma, who in zip(
                selection["grid"], selection.get("raised_experts", [])
            )
            if who
        ]
        if left_out:
            sentence += (
                " Left out because they raised one expert's held-out loss by more "
                f"than {limit} over the largest weight: "
                + "; ".join(
                    f"{gamma:g} ({', '.join(short_labels(who))})"
                    for gamma, who in left_out
                )
                + " (a larger `task_weight` favours an expert's domain)."
            )
    elif selection and selection.get("note"):
        sentence += f" reg_weight: auto: {selection['note']}."
    check = report.get("stage2_check")
    if check:
        held = check["held_out_alignment"]
        if check["kept"]:
            verdict = "so stage 2 was kept"
        elif check["raised_experts"]:
            verdict = (
                "but it raised the held-out loss of "
                + ", ".join(short_labels(check["raised_experts"]))
                + ", so the merge keeps stage 1's coefficients"
            )
        else:
            verdict = (
                "not lower by more than one standard error, so the merge keeps "
                "stage 1's coefficients"
            )
        sentence += (
            f" Stage 2 checked on the same held-out samples: {held['stage2']:.4f} "
            f"against stage 1's {held['stage1']:.4f} (standard error "
            f"{check['standard_error']:.4f}), {verdict}."
        )
    heading = outcome_heading(report.get("outcome") or {})
    if heading:
        sentence += f" **{heading.capitalize()}:** {report['outcome']['message']}"
    return sentence


def outcome_heading(outcome: Mapping) -> str | None:
    """What a run's ``outcome`` warns of (it has a message only then), or None."""
    if not outcome.get("message"):
        return None
    where = "barely moved from" if outcome["moved"] else "ended at"
    return f"calibration {where} its start"
