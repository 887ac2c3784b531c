"""Memory-lean calibration gives the same coefficients as the plain one."""

from __future__ import annotations

import json
import os

import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import expert_config
from mergekit_expert.cli import main


def calibrate(tiny, tmp_path, name, method="expert_merging_pp", **calibration):
    document = expert_config(tiny, method=method, calibration={"epochs": 2, "budget": 2.0, **calibration})
    config = tmp_path / f"{name}.yml"
    config.write_text(yaml.safe_dump(document))
    out = tmp_path / name
    result = CliRunner().invoke(main, [str(config), str(out), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    coefficients = load_file(os.path.join(out, "expert_merging", "coefficients.safetensors"))
    report = json.load(open(out / "expert_merging" / "report.json"))
    return coefficients, report


def assert_same(a, b, **tolerance):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tolerance)


def test_streamed_equals_resident(tiny, tmp_path):
    resident, _ = calibrate(tiny, tmp_path, "resident", task_vectors="resident")
    streamed, _ = calibrate(tiny, tmp_path, "streamed", task_vectors="streamed")
    assert_same(resident, streamed, rtol=1e-5, atol=1e-6)
