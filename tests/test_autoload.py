"""Plain mergekit entry points know the methods once mergekit-expert is installed.

Each check runs a fresh interpreter: the autoload hook acts at start-up.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import yaml

from mergekit_expert.coefficients import CoefficientArtifact
from mergekit_expert.testing.cli import BIN, host_env, write_config
from mergekit_expert.testing.cli import run_host as run
from mergekit_expert.testing.oracles import expected_model
from mergekit_expert.testing.oracles import load_tensors as model_tensors


def test_mergekit_yaml_merges_from_artifact(tiny, tmp_path):
    """The real ``mergekit-yaml`` script, nothing imported by the user."""
    base = model_tensors(tiny.base)
    generator = torch.Generator().manual_seed(0)
    coefficients = {}
    for index, name in enumerate(sorted(base)):
        if "layers.0." in name and name.endswith("proj.weight"):
            m = 1 if index % 2 else 4  # stage-1 and chunk-wise rows
            coefficients[name] = torch.rand(2, m, generator=generator)
    assert len(coefficients) >= 4
    artifact = tmp_path / "coefficients.safetensors"
    CoefficientArtifact(
        coefficients=coefficients,
        method="expert_merging_pp",
        base=tiny.base,
        experts=tiny.experts,
        init=[0.3, 0.3],
    ).save(str(artifact))
    config = write_config(
        tmp_path / "merge.yml",
        {
            "merge_method": "expert_merging_pp",
            "base_model": tiny.base,
            "models": [{"model": path} for path in tiny.experts],
            "parameters": {"coefficients": str(artifact)},
            "dtype": "float32",
        },
    )
    out = tmp_path / "out"
    result = run(
        [str(BIN / "mergekit-yaml"), config, str(out), "--quiet"], host_env(tmp_path)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    merged = model_tensors(str(out))
    expected = expected_model(tiny.base, tiny.experts, coefficients)
    assert merged.keys() == expected.keys()
    for name, tensor in merged.items():
        torch.testing.assert_close(
            tensor.double(), expected[name], rtol=1e-6, atol=1e-6, msg=name
        )
        if name not in coefficients:
            assert torch.equal(tensor, base[name]), name


def test_switched_off_fails_as_mergekit_does(tiny, tmp_path):
    config = write_config(
        tmp_path / "merge.yml",
        {
            "merge_method": "expert_merging",
            "base_model": tiny.base,
            "models": [
                {"model": path, "parameters": {"weight": 0.5}} for path in tiny.experts
            ],
            "dtype": "float32",
        },
    )
    result = run(
        [str(BIN / "mergekit-yaml"), config, str(tmp_path / "out"), "--quiet"],
        host_env(tmp_path, autoload=False),
    )
    assert result.returncode != 0
    assert "Unimplemented merge method expert_merging" in result.stderr


START_UP = """
import json, sys
print(json.dumps({
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in
                      ("torch", "mergekit", "mergekit_expert", "transformers")),
    "hook": "mergekit_expert_autoload" in sys.modules,
    "armed": any(type(f).__name__ == "_Finder" for f in sys.meta_path),
}))
"""


@pytest.mark.parametrize("autoload", [True, False])
def test_start_up_imports_nothing_heavy(tmp_path, autoload):
    result = run(
        [str(BIN / "python"), "-c", START_UP], host_env(tmp_path, autoload=autoload)
    )
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout)
    assert state["modules"] == []
    assert state["hook"] is True  # the .pth line runs either way
    assert state["armed"] is autoload


# One interpreter, many first imports: forget every mergekit module, re-arm
# the hook, import an entry module first, then look the methods up.
IMPORT_ORDERS = """
import json, os, sys
import mergekit_expert_autoload as hook

def forget():
    for name in list(sys.modules):
        if name.split(".")[0] in ("mergekit", "mergekit_expert"):
            del sys.modules[name]

results = {}
for entry in json.loads(sys.argv[1]):
    forget()
    hook.install()
    try:
        __import__(entry)
        from mergekit import merge_methods
        names = [merge_methods.get(n).spec.name
                 for n in ("expert_merging", "expert_merging_pp")]
        results[entry] = [names, repr(hook.state["error"]), hook.state["fired"]]
    except Exception as error:
        results[entry] = repr(error)

# The mergekit modules that importing mergekit_expert adds must not themselves
# import mergekit.merge_methods: then none of them can be half-executed above
# the hook when it fires, so the plugin's import never meets a partial module.
forget()
os.environ["MERGEKIT_EXPERT_AUTOLOAD"] = "0"
hook.install()
import mergekit.merge_methods
before = {m for m in sys.modules if m.split(".")[0] == "mergekit"}
import mergekit_expert
extra = sorted({m for m in sys.modules if m.split(".")[0] == "mergekit"} - before)
forget()
for name in extra:
    __import__(name)
results["extra"] = [extra, "mergekit.merge_methods" in sys.modules]

# switched off when mergekit is imported: no registration
forget()
hook.state["fired"] = False
sys.meta_path.insert(0, hook.FINDER)  # armed at start-up, switched off later
from mergekit import merge_methods
try:
    merge_methods.get("expert_merging")
    results["off"] = "registered"
except RuntimeError as error:
    results["off"] = str(error)

# a broken plugin: one warning, other methods unaffected
os.environ["MERGEKIT_EXPERT_AUTOLOAD"] = "1"
forget()
broken = sys.argv[2]
os.makedirs(os.path.join(broken, "mergekit_expert"), exist_ok=True)
with open(os.path.join(broken, "mergekit_expert", "__init__.py"), "w") as f:
    f.write("raise ImportError('simulated broken install')\\n")
sys.path.insert(0, broken)
hook.install()
from mergekit import merge_methods
results["broken"] = [merge_methods.get("task_arithmetic").spec.name, repr(hook.state["error"])]
print(json.dumps(results))
"""

ENTRIES = [
    "mergekit.merge_methods",
    "mergekit.merge_methods.base",
    "mergekit.merge_methods.registry",
    "mergekit.architecture",
    "mergekit.config",
    "mergekit.card",
    "mergekit.plan",
    "mergekit.merge",
    "mergekit.scripts.run_yaml",
    "mergekit.scripts.multimerge",
    "mergekit_expert",
    "mergekit_expert.methods",
    "mergekit_expert.cli",
]


def test_every_import_order_registers_without_cycles(tmp_path):
    result = run(
        [str(BIN / "python"), "-c", IMPORT_ORDERS, json.dumps(ENTRIES), str(tmp_path)],
        host_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for entry in ENTRIES:
        assert results[entry][0] == ["expert_merging", "expert_merging_pp"], (
            entry,
            results[entry],
        )
        assert results[entry][1] == "None", (entry, results[entry])
    extra, imports_target = results["extra"]
    assert "mergekit.merge" not in extra and "mergekit.plan" not in extra, extra
    assert imports_target is False, extra
    assert results["off"] == "Unimplemented merge method expert_merging"
    assert results["broken"][0] == "task_arithmetic"
    assert "simulated broken install" in results["broken"][1]
    assert "could not register expert_merging" in result.stderr
    assert "MERGEKIT_EXPERT_AUTOLOAD=0" in result.stderr


def test_run_merge_in_fresh_interpreter(tiny, tmp_path):
    """``mergekit.merge.run_merge`` from a script that never names the plugin."""
    script = textwrap.dedent(
        f"""
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions
        config = MergeConfiguration.model_validate({{
            "merge_method": "expert_merging",
            "base_model": {tiny.base!r},
            "models": [{{"model": p, "parameters": {{"weight": w}}}}
                       for p, w in zip({tiny.experts!r}, (0.25, -0.5))],
            "dtype": "float32",
        }})
        run_merge(config, {str(tmp_path / "out")!r}, options=MergeOptions(quiet=True))
        """
    )
    result = run([str(BIN / "python"), "-c", script], host_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    base = model_tensors(tiny.base)
    merged = model_tensors(str(tmp_path / "out"))
    alpha = torch.tensor([[0.25], [-0.5]])
    expected = expected_model(tiny.base, tiny.experts, dict.fromkeys(base, alpha))
    assert merged.keys() == expected.keys()
    for name, tensor in merged.items():
        torch.testing.assert_close(
            tensor.double(), expected[name], rtol=1e-6, atol=1e-6
        )


def test_mergekit_multi(tiny, tmp_path):
    """``mergekit-multi``: a named expert merge feeding a final linear merge."""
    name = "model.layers.1.mlp.down_proj.weight"
    coefficients = {name: torch.tensor([[0.7], [-0.2]])}
    artifact = tmp_path / "coefficients.safetensors"
    CoefficientArtifact(
        coefficients=coefficients,
        method="expert_merging",
        base=tiny.base,
        experts=tiny.experts,
        init=[0.3, 0.3],
    ).save(str(artifact))
    documents = [
        {
            "name": "experts",
            "merge_method": "expert_merging",
            "base_model": tiny.base,
            "models": [{"model": path} for path in tiny.experts],
            "parameters": {"coefficients": str(artifact)},
            "dtype": "float32",
        },
        {
            "merge_method": "linear",
            "models": [{"model": "experts", "parameters": {"weight": 1.0}}],
            "dtype": "float32",
        },
    ]
    config = tmp_path / "multi.yml"
    config.write_text(yaml.safe_dump_all(documents))
    out = tmp_path / "final"
    result = run(
        [
            str(BIN / "mergekit-multi"),
            str(config),
            "--out-path",
            str(out),
            "-I",
            str(tmp_path / "intermediate"),
            "--quiet",
        ],
        host_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = expected_model(tiny.base, tiny.experts, coefficients)
    for tensor_name, tensor in model_tensors(str(out)).items():
        torch.testing.assert_close(
            tensor.double(), expected[tensor_name], rtol=1e-6, atol=1e-6
        )
