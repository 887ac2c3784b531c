"""`mergekit-expert export`: a stage-1 artifact as a stock task_arithmetic config."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner
from mergekit.config import ConditionalParameter, MergeConfiguration, evaluate_setting
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from mergekit_expert.coefficients import CoefficientArtifact
from mergekit_expert.errors import ExpertMergingError
from mergekit_expert.export import export_config, main, weight_filters, write_config
from mergekit_expert.testing.cli import BIN
from mergekit_expert.testing.cli import run_host as run
from mergekit_expert.testing.oracles import expected_model
from mergekit_expert.testing.oracles import load_tensors as model_tensors


def resolve(name, filters):
    setting = [ConditionalParameter.model_validate(f) for f in filters]
    return evaluate_setting(name, setting, validate=float)


def test_filters_survive_substring_names():
    """Names inside other names: longest first, explicit zeros, catch-all."""
    names = [
        "a.weight",
        "x.a.weight",  # contains a listed name, is listed itself
        "x.a.weight_scale",  # contains listed names, is not listed: must be 0
        "b.weight",
        "mlp.w1",
        "mlp.w10",  # contains a listed name, not listed
        "norm",
        "model.norm.weight",  # ditto
    ]
    values = {"a.weight": 0.5, "x.a.weight": -1.25, "mlp.w1": 2.0, "norm": 0.75}
    filters = weight_filters(values, names)
    for name in names:
        assert resolve(name, filters) == values.get(name, 0.0), name
    # the naive order (as listed, no explicit zeros) gets four of them wrong
    naive = [{"filter": n, "value": v} for n, v in values.items()] + [{"value": 0.0}]
    wrong = [n for n in names if resolve(n, naive) != values.get(n, 0.0)]
    assert wrong == ["x.a.weight", "x.a.weight_scale", "mlp.w10", "model.norm.weight"]


def save_artifact(path, tiny, coefficients, experts=None) -> str:
    chunked = any(matrix.shape[1] > 1 for matrix in coefficients.values())
    CoefficientArtifact(
        coefficients=coefficients,
        method="expert_merging_pp" if chunked else "expert_merging",
        base=tiny.base,
        experts=experts or tiny.experts,
        init=[0.3] * len(experts or tiny.experts),
    ).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def stage1(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    base = model_tensors(tiny.base)
    generator = torch.Generator().manual_seed(3)
    coefficients = {}
    for name in sorted(base):
        if name.endswith("proj.weight") and "layers.1." in name:
            coefficients[name] = torch.randn(2, 1, generator=generator)
    first = next(iter(coefficients))
    coefficients[first] = torch.tensor([[0.0], [1.5]])
    # chunk columns that are all equal are a stage-1 row in disguise
    coefficients["model.layers.0.mlp.up_proj.weight"] = torch.full((2, 3), -0.25)
    return root, save_artifact(root / "coefficients.safetensors", tiny, coefficients)


def no_plugin_env(root) -> dict[str, str]:
    """mergekit_expert cannot be imported at all: any import of it fails."""
    shadow = root / "shadow"
    (shadow / "mergekit_expert").mkdir(parents=True, exist_ok=True)
    (shadow / "mergekit_expert" / "__init__.py").write_text(
        "raise ImportError('the exported config must not need mergekit_expert')\n"
    )
    (shadow / "mergekit_expert_autoload.py").write_text("def install():\n    pass\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(shadow)
    env["MERGEKIT_EXPERT_AUTOLOAD"] = "0"
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def test_exported_config_reproduces_the_merge(tiny, stage1):
    root, artifact = stage1
    document = export_config(artifact, dtype="float32")
    assert document["merge_method"] == "task_arithmetic"
    assert document["parameters"] == {"normalize": False, "lambda": 1.0}
    config = root / "exported.yml"
    write_config(document, str(config), artifact)

    out = root / "exported_out"
    result = run(
        [str(BIN / "mergekit-yaml"), str(config), str(out), "--quiet"],
        no_plugin_env(root),
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    loaded = CoefficientArtifact.load(artifact)
    base = model_tensors(tiny.base)
    expected = expected_model(tiny.base, tiny.experts, dict(loaded.coefficients))
    merged = model_tensors(str(out))
    assert merged.keys() == expected.keys()
    for name, tensor in merged.items():
        # float32 task arithmetic vs a float64 reference: float32 rounding
        torch.testing.assert_close(
            tensor.double(), expected[name], rtol=1e-6, atol=1e-6, msg=name
        )
        if name not in loaded.coefficients:
            assert torch.equal(tensor, base[name]), name

    # and the plugin's own merge from the artifact gives the same model
    plugin_out = root / "plugin_out"
    run_merge(
        MergeConfiguration.model_validate(
            {
                "merge_method": loaded.method,
                "base_model": tiny.base,
                "models": [{"model": path} for path in tiny.experts],
                "parameters": {"coefficients": artifact},
                "dtype": "float32",
            }
        ),
        str(plugin_out),
        options=MergeOptions(quiet=True),
    )
    plugin = model_tensors(str(plugin_out))
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, plugin[name], rtol=1e-6, atol=1e-7)


def test_chunkwise_coefficients_are_refused(tiny, tmp_path):
    artifact = save_artifact(
        tmp_path / "pp.safetensors",
        tiny,
        {"model.layers.0.mlp.up_proj.weight": torch.tensor([[0.1, 0.2], [0.3, 0.3]])},
    )
    with pytest.raises(ExpertMergingError, match=r"chunk-wise.*up_proj.weight \(m=2\)"):
        export_config(artifact)


def test_overrides_and_mismatches(tiny, stage1, tmp_path):
    _root, artifact = stage1
    moved = str(tmp_path / "moved_base")
    shutil.copytree(tiny.base, moved)
    document = export_config(artifact, base=moved, experts=["e0", "e1"])
    assert document["base_model"] == moved
    assert [m["model"] for m in document["models"]] == ["e0", "e1"]
    document = export_config(artifact, experts={tiny.experts[1]: "other"})
    assert [m["model"] for m in document["models"]] == [tiny.experts[0], "other"]
    half = export_config(artifact, dtype="bfloat16")
    assert (half["dtype"], half["out_dtype"]) == ("float32", "bfloat16")
    with pytest.raises(ExpertMergingError, match="1 expert reference"):
        export_config(artifact, experts=["only-one"])
    with pytest.raises(ExpertMergingError, match="does not list"):
        export_config(artifact, experts={"unknown": "x"})
    wrong = save_artifact(
        tmp_path / "wrong.safetensors", tiny, {"not.in.base.weight": torch.ones(2, 1)}
    )
    with pytest.raises(ExpertMergingError, match="does not have"):
        export_config(wrong)


def test_cli_writes_the_same_config(stage1, tmp_path):
    _root, artifact = stage1
    out = tmp_path / "cli.yml"
    result = CliRunner().invoke(main, [artifact, "-o", str(out), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(out.read_text()) == export_config(artifact, dtype="float32")
    result = CliRunner().invoke(main, [artifact, "--expert", "only-one"])
    assert result.exit_code != 0 and "expert reference" in result.output


def test_cli_never_overwrites_a_file_it_did_not_write(stage1, tmp_path):
    _root, artifact = stage1
    notes = tmp_path / "notes.yml"
    notes.write_text("my own config\n")
    before = open(artifact, "rb").read()
    for target in (str(notes), artifact):  # a user's file, the artifact itself
        result = CliRunner().invoke(main, [artifact, "-o", target])
        assert result.exit_code != 0 and "Error:" in result.output, result.output
        assert "was not written by mergekit-expert export" in result.output
    assert notes.read_text() == "my own config\n"
    assert open(artifact, "rb").read() == before
    # A previous export is replaced, and the result is the fresh export. A
    # user's link at PATH.partial is neither followed nor removed.
    out = tmp_path / "again.yml"
    os.symlink(notes, f"{out}.partial")
    for _ in range(2):
        result = CliRunner().invoke(main, [artifact, "-o", str(out)])
        assert result.exit_code == 0, result.output
    assert yaml.safe_load(out.read_text()) == export_config(artifact)
    assert os.readlink(f"{out}.partial") == str(notes)
    assert notes.read_text() == "my own config\n"
    assert not [
        n
        for n in os.listdir(tmp_path)
        if n.endswith(".partial") and n != "again.yml.partial"
    ]
    missing = tmp_path / "no" / "such" / "folder.yml"
    result = CliRunner().invoke(main, [artifact, "-o", str(missing)])
    assert result.exit_code != 0 and f"cannot write {missing}" in result.output


def test_entry_point_dispatches_export(stage1, tmp_path, capsys):
    from mergekit_expert.entry import main as entry

    _root, artifact = stage1
    out = tmp_path / "entry.yml"
    with pytest.raises(SystemExit) as exit_info:
        entry(["export", artifact, "-o", str(out)])
    assert exit_info.value.code == 0
    assert yaml.safe_load(out.read_text())["merge_method"] == "task_arithmetic"
    with pytest.raises(SystemExit) as exit_info:
        entry(["--help"])  # anything else is the merge command, as before
    assert exit_info.value.code == 0
    assert "CONFIG_FILE" in capsys.readouterr().out
