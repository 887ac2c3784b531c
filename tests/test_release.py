"""A published merge: reproducible from its own folder, a card without local paths."""

from __future__ import annotations

import os
import re

import pytest
import torch
import yaml

from mergekit_expert.card import heatmap_cells, short_labels
from mergekit_expert.testing.cli import invoke, read_model, run_document
from mergekit_expert.testing.tiny import expert_config


@pytest.fixture(scope="module")
def published(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("release")
    document = expert_config(tiny, lora=False, calibration={"epochs": 1})
    return run_document(folder, document)


def test_the_output_reproduces_itself_without_calibration_data(
    published, tmp_path, monkeypatch
):
    out = published.out
    config = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert "calibration" not in config
    assert config["parameters"] == {
        "coefficients": "expert_merging/coefficients.safetensors"
    }
    assert all("parameters" not in m for m in config["models"])
    # The calibration config is kept beside the coefficients, as it was written.
    kept = out / "expert_merging" / "calibration_config.yml"
    assert kept.read_text() == open(published.config).read()
    # From another folder: the relative coefficients path follows the config.
    monkeypatch.chdir(tmp_path)
    result = invoke(out / "mergekit_config.yml", "again")
    assert result.exit_code == 0, result.output
    first, second = published.model, read_model(tmp_path / "again")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_the_model_card(tiny, published):
    card = (published.out / "README.md").read_text()
    for path in [tiny.base, *tiny.experts]:
        assert path not in card, "absolute local paths must not be published"
    assert "expert1" in card and "expert2" in card  # named by their folders
    coefficients = published.coefficients
    report = published.report
    # The card summarises the calibrated coefficients, not the excluded
    # weights held at the initial alpha (at_init).
    assert report["at_init"] and set(report["at_init"]) < set(coefficients)
    trained = [a for n, a in coefficients.items() if n not in report["at_init"]]
    for k in range(2):
        values = torch.cat([a[k] for a in trained])
        row = (
            f"| {os.path.basename(tiny.experts[k])} | 0.300 | "
            f"{values.min():.3f} / {values.mean():.3f} / {values.max():.3f} | 3 |"
        )
        assert row in card, row
    loss = report["loss"]
    start, after = loss["task_arithmetic_init"], loss["stage1"]
    change = 100 * (after - start) / start
    assert (
        f"Calibration alignment loss: {start:.4f} for task arithmetic at alpha = "
        f"0.30, {after:.4f} after stage 1 ({change:+.1f} %)."
    ) in card
    assert "![learned coefficients](expert_merging/coefficients.png)" in card
    assert "mergekit-expert mergekit_config.yml ./merged" in card
    assert report["outcome"]["moved"] == (
        max(float((a - 0.3).abs().max()) for a in coefficients.values()) > 1e-6
    )


def test_summary_line(published):
    report = published.report
    line = next(x for x in published.output.splitlines() if x.startswith("wrote "))
    assert line.startswith(f"wrote Expert Merging merge to {published.out}")
    assert f"{report['loss']['stage1']:.4g} (stage1)" in line
    assert re.search(r"; \d+\.\d s$", line)
    # reg_weight: auto (the default): the largest grid value whose held-out
    # loss is within its standard error of the lowest (among the values that
    # raise no expert's held-out loss by more than two errors), used for the
    # calibration and named in the line and the card.
    selection = report["reg_weight_selection"]
    grid, held = selection["grid"], selection["held_out_alignment"]
    errors = selection["standard_error"]
    assert grid == [0.8, 0.2, 0.05, 0.0] and len(held) == len(errors) == len(grid)
    low = min(range(len(grid)), key=lambda i: (held[i], -grid[i]))
    assert selection["lowest"] == grid[low]
    # Points that raise an expert's held-out loss are left out (the rule is
    # checked against a naive reference in test_optimizer.py); the standard
    # errors are those of the difference to the lowest point left in.
    kept = [i for i, who in enumerate(selection["raised_experts"]) if not who]
    best_kept = min(kept, key=lambda i: (held[i], -grid[i]))
    assert errors[best_kept] == 0.0
    best = next(grid[i] for i in kept if held[i] - held[best_kept] <= errors[i])
    assert selection["reg_weight"] == best == report["calibration"]["reg_weight"]
    assert f"; reg_weight {best:g} (auto); " in line
    card = (published.out / "README.md").read_text()
    assert f"The regularizer's weight (reg_weight: auto) was {best:g}" in card
    # The card names the points left out, and only when there are some (the
    # sentence itself is checked by hand in test_optimizer.py).
    left_out = [g for g, who in zip(grid, selection["raised_experts"]) if who]
    named = "Left out because they raised one expert's held-out loss" in card
    assert named == bool(left_out)
    assert "by more than 2 standard errors and 0.125 of the total's fall" in card


def test_heatmap_columns_are_distinct_for_same_named_checkpoints():
    experts = ["/runs/code/checkpoint-500", "/runs/math/checkpoint-500"]
    labels = short_labels(experts)
    assert labels == ["code/checkpoint-500", "math/checkpoint-500"]
    assert short_labels(["a/x", "b/y"]) == ["x", "y"]
    assert short_labels(["org/model", "org/model+adapters/chat"]) == ["model", "chat"]
    projections = ["q_proj", "k_proj", "v_proj", "o_proj"]
    projections += ["gate_proj", "up_proj", "down_proj"]
    coefficients = {
        f"model.layers.0.{'mlp' if 'p_' in p and p[0] in 'gud' else 'self_attn'}."
        f"{p}.weight": torch.rand(2, 1)
        for p in projections
    }
    cells, _ = heatmap_cells(coefficients, labels)
    assert len({column for _, column in cells}) == 14
