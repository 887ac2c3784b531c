"""Through the real CLI on tiny models saved to disk, merged by mergekit's writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from mergekit_expert.testing.cli import (
    invoke,
    read_coefficients,
    read_model,
    read_report,
    write_config,
)
from mergekit_expert.testing.oracles import expected_model, lora_delta
from mergekit_expert.testing.tiny import expert_config

BIN = os.path.dirname(sys.executable)


def run_cli(*args) -> None:
    result = invoke(*args, catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def calibrated(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    # Without the regularizer any alignment gain lowers the objective, so the
    # kept coefficients are trained ones, not the initial 0.3 (checked below).
    config = write_config(
        root / "merge.yml", expert_config(tiny, calibration={"reg_weight": 0.0})
    )
    out = str(root / "out")
    run_cli(config, out)
    return config, out


def test_output_equals_task_arithmetic_from_artifact(tiny, calibrated):
    _config, out = calibrated
    artifact_path = os.path.join(out, "expert_merging", "coefficients.safetensors")
    with safe_open(artifact_path, framework="pt") as handle:
        metadata = handle.metadata()
        coefficients = {n: handle.get_tensor(n) for n in handle.keys()}
    assert metadata["format"] == "mergekit-expert/1"
    assert metadata["method"] == "expert_merging"
    assert metadata["base"] == tiny.base
    experts = json.loads(metadata["experts"])
    assert experts == [tiny.experts[0], tiny.experts[1], tiny.lora]
    init = json.loads(metadata["init"])
    assert len(init) == 3 and all(abs(v - 0.3) < 1e-6 for v in init)

    adapter = lora_delta(tiny.lora.split("+")[1])
    assert adapter, "the LoRA adapter must target some weights"
    merged = read_model(out)
    # Only the block projections are calibrated; norms and embeddings are
    # merged at the initial alpha (excluded: init, the default).
    expected = expected_model(tiny.base, experts, coefficients)
    assert set(merged) == set(expected)
    trained = {n for n in expected if n.endswith("proj.weight")}
    at_init = set(json.loads(metadata["at_init"]))
    assert at_init == set(expected) - trained
    assert set(coefficients) == set(expected)
    for name in at_init:
        torch.testing.assert_close(
            coefficients[name], torch.full((3, 1), 0.3), rtol=0, atol=1e-7
        )
    for name, tensor in merged.items():
        if name in coefficients:
            matrix = coefficients[name]
            assert matrix.shape == (3, 1) and matrix.dtype == torch.float32
        torch.testing.assert_close(
            tensor.double(), expected[name], rtol=1e-5, atol=1e-6
        )
    # Training moved the coefficients away from the init.
    assert any((coefficients[n] - 0.3).abs().max() > 1e-3 for n in trained)


def test_report_png_and_model_card(tiny, calibrated):
    _config, out = calibrated
    report = read_report(out)
    assert report["experts"] == [tiny.experts[0], tiny.experts[1], tiny.lora]
    assert report["task_weights"] == [1.0, 1.2, 1.0]
    assert report["samples_per_expert"] == [3, 3, 3]
    stage1 = report["stage1"]  # prox: one entry per accepted full-batch step
    assert len(stage1["epoch_loss"]) == stage1["optimizer_steps"] > 0
    assert len(stage1["objective"]) == stage1["optimizer_steps"] + 1
    assert stage1["evaluations"] >= stage1["optimizer_steps"] + 1
    assert {"teacher", "stage1", "write"} <= set(report["stages"])
    assert all(
        s["wall_s"] >= 0 and s["peak_rss_mib"] > 0 for s in report["stages"].values()
    )
    # Prompt-only records got pseudo-labels from their own expert.
    assert sorted(p["expert"] for p in report["pseudo_labels"]) == [1, 1, 2]
    with open(os.path.join(out, "expert_merging", "coefficients.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "## Expert Merging (mergekit-expert)" in card
    artifact = read_coefficients(out)
    # The summary covers the calibrated projections, not the weights at init.
    mean_first = float(
        torch.cat(
            [m[0] for n, m in artifact.items() if n.endswith("proj.weight")]
        ).mean()
    )
    assert abs(report["mean_alpha"][0] - mean_first) < 1e-6


def test_merge_from_artifact_without_calibration(tiny, calibrated, tmp_path):
    config, out = calibrated
    artifact = os.path.join(out, "expert_merging", "coefficients.safetensors")
    again = str(tmp_path / "again")
    run_cli(config, again, "--coefficients", artifact)
    first, second = read_model(out), read_model(again)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    report = read_report(again)
    assert "teacher" not in report["stages"], "no calibration may run"

    # Plain mergekit run_merge, with the artifact named in the YAML.
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    document = expert_config(tiny)
    document.pop("calibration")
    document["parameters"] = {"coefficients": artifact}
    plain = str(tmp_path / "plain")
    run_merge(
        MergeConfiguration.model_validate(document),
        plain,
        MergeOptions(lora_merge_cache=str(tmp_path / "lora"), quiet=True),
    )
    third = read_model(plain)
    for name in first:
        assert torch.equal(first[name], third[name]), name


def test_other_methods_behave_like_mergekit_yaml(tiny, tmp_path):
    document = {
        "merge_method": "ties",
        "base_model": tiny.base,
        "models": [
            {"model": tiny.experts[0], "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": tiny.experts[1], "parameters": {"weight": 0.4, "density": 0.5}},
        ],
        "dtype": "float32",
    }
    config = write_config(tmp_path / "ties.yml", document)
    for tool, out in (("mergekit-yaml", "a"), ("mergekit-expert", "b")):
        subprocess.run(
            [os.path.join(BIN, tool), config, str(tmp_path / out), "--quiet"],
            check=True,
            capture_output=True,
        )
    a, b = read_model(tmp_path / "a"), read_model(tmp_path / "b")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not os.path.exists(tmp_path / "b" / "expert_merging")
