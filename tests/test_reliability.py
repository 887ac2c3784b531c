"""Resume after SIGKILL, atomic output, guarded numerics, determinism, pickle refusal."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_expert.testing.cli import (
    invoke,
    kill_at,
    reached,
    read_coefficients,
    read_report,
    write_config,
)
from mergekit_expert.testing.tiny import expert_config

# Settings where every measured point lowers the objective, so a resume that
# restored the wrong state could not hide behind coefficients that never moved.
# Two samples per expert (three experts, the LoRA one included). adamw (the
# paper's loop): steps of three samples, two optimizer steps per epoch, each
# epoch in its own seeded order; prox: six accepted full-batch steps per stage.
EPOCHS, STEPS_PER_EPOCH = 3, 2
PAPER_LOOP = {
    "optimizer": "adamw",
    "epochs": EPOCHS,
    "samples_per_expert": 2,
    "accumulation": 3,
    "patience": 100,
    "budget": 3.0,
    "reg_weight": 0.0,
    "lr": 0.05,
}
PROX = {"samples_per_expert": 2, "max_steps": 6, "budget": 3.0, "reg_weight": 0.0}
STEPS = {"adamw": EPOCHS * STEPS_PER_EPOCH, "prox": 6}
POINTS = {"adamw": EPOCHS, "prox": 6}  # measurements after the start


def run_cli(*args):
    return invoke(*args, catch_exceptions=False)


@pytest.mark.parametrize("settings", [PROX, PAPER_LOOP], ids=["prox", "adamw"])
def test_sigkill_in_stage1_and_stage2_then_resume_is_identical(
    tiny, tmp_path, settings
):
    optimizer = settings.get("optimizer", "prox")
    document = expert_config(tiny, method="expert_merging_pp", calibration=settings)
    config = write_config(tmp_path / "merge.yml", document)
    reference = tmp_path / "reference"
    assert run_cli(config, reference).exit_code == 0
    report = read_report(reference)
    for stage in ("stage1", "stage2"):
        objective = report[stage]["objective"]
        points = POINTS[optimizer]
        assert report[stage]["kept_epoch"] == len(objective) - 1 == points, stage
        assert all(b < a for a, b in zip(objective, objective[1:])), objective
        assert report[stage]["optimizer_steps"] == STEPS[optimizer], stage
    assert any(
        (a - 0.3).abs().max() > 1e-3 for a in read_coefficients(reference).values()
    )

    out = tmp_path / "out"
    kill_at(config, out, reached("stage1", 3))  # inside stage 1's second epoch
    assert not out.exists(), "an interrupted run must not leave OUT"
    kill_at(config, out, reached("stage2", 2))  # resumed stage 1, killed in stage 2
    assert not out.exists()
    result = run_cli(config, out)
    assert result.exit_code == 0, result.output
    assert not os.path.exists(str(out) + ".partial"), "the working directory is removed"
    assert read_report(out)["resumed"], "stage 2 is resumed, not redone from the start"
    expected, got = read_coefficients(reference), read_coefficients(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    ref_model = load_file(os.path.join(reference, "model.safetensors"))
    out_model = load_file(os.path.join(out, "model.safetensors"))
    for name in ref_model:
        assert torch.equal(ref_model[name], out_model[name]), name


def test_changed_config_invalidates_the_checkpoint(tiny, tmp_path):
    document = expert_config(tiny, calibration=PAPER_LOOP)
    config = write_config(tmp_path / "merge.yml", document)
    out = tmp_path / "out"
    kill_at(config, out, reached("stage1", 2))
    document["calibration"]["reg_weight"] = 0.5
    changed = write_config(tmp_path / "changed.yml", document)
    result = invoke(changed, out, quiet=False, catch_exceptions=False)
    assert result.exit_code == 0
    report = read_report(out)
    assert report["calibration"]["reg_weight"] == 0.5 and not report["resumed"]
    # A fresh start trains every step of every epoch again.
    assert report["stage1"]["optimizer_steps"] == EPOCHS * STEPS_PER_EPOCH


def test_state_of_another_release_is_not_resumed(tiny, tmp_path, monkeypatch, caplog):
    import mergekit_expert

    config = write_config(
        tmp_path / "merge.yml", expert_config(tiny, calibration=PAPER_LOOP)
    )
    out = tmp_path / "out"
    saved = kill_at(config, out, reached("stage1", 2))
    assert saved, "the killed run saved a state to resume from"
    later = mergekit_expert.__version__ + ".next"
    monkeypatch.setattr(mergekit_expert, "__version__", later)
    with caplog.at_level("WARNING", logger="mergekit_expert.output"):
        result = invoke(config, out, quiet=False, catch_exceptions=False)
    assert result.exit_code == 0
    assert "mergekit-expert version changed" in caplog.text
    report = read_report(out)
    objective = report["stage1"]["objective"]
    assert objective[-1] < objective[0], "the fresh start trained"
    assert not report["resumed"]
    assert report["stage1"]["optimizer_steps"] == EPOCHS * STEPS_PER_EPOCH


def tree_digest(path) -> dict[str, str]:
    digests = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            digests[os.path.relpath(full, path)] = hashlib.sha256(
                open(full, "rb").read()
            ).hexdigest()
    return digests


def test_failure_during_write_keeps_existing_out(tiny, tmp_path, monkeypatch):
    from mergekit.io.tensor_writer import TensorWriter

    config = write_config(
        tmp_path / "merge.yml", expert_config(tiny, calibration={"max_steps": 10})
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous model")
    (out / "notes.txt").write_text("keep me")
    before = tree_digest(out)

    real_save = TensorWriter.save_tensor
    calls = {"n": 0}

    def failing_save(self, name, tensor, clone=False):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full (injected)")
        return real_save(self, name, tensor, clone)

    monkeypatch.setattr(TensorWriter, "save_tensor", failing_save)
    result = invoke(config, out, "--overwrite")
    assert result.exit_code != 0 and calls["n"] == 5
    assert tree_digest(out) == before, "a failed write must leave OUT byte-identical"
    staging = os.path.join(str(out) + ".partial", "staging")
    assert not os.path.exists(staging), "no half-written output is kept"
    monkeypatch.setattr(TensorWriter, "save_tensor", real_save)
    # Calibration had finished: the rerun resumes and only writes.
    assert "notes.txt" in run_cli(config, str(out)).output, "foreign: refused"
    assert tree_digest(out) == before
    assert run_cli(config, str(out), "--overwrite").exit_code == 0
    assert not (out / "notes.txt").exists(), "OUT is replaced as a whole"
    report = read_report(out)
    assert report["resumed"], "the finished calibration is resumed, not redone"
    assert report["stage1"]["evaluations"] >= 1
    # reg_weight: auto's choice came back from the checkpoint: no second path.
    selection = report["reg_weight_selection"]
    assert len(selection["held_out_alignment"]) == len(selection["grid"]) == 4
    assert report["calibration"]["reg_weight"] == selection["reg_weight"]
    assert "reg_weight_selection" not in report["stages"]


def test_nan_in_an_expert_is_named(tiny, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny.experts[1], broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    document = expert_config(tiny, lora=False)
    document["models"][1]["model"] = str(broken)
    out = tmp_path / "out"
    result = invoke(write_config(tmp_path / "merge.yml", document), out)
    assert result.exit_code != 0
    assert str(broken) in result.output and "NaN" in result.output
    assert not out.exists()


def test_same_seed_gives_bit_identical_coefficients(tiny, tmp_path):
    # reg_weight 0.05: at 0.8 these noise experts keep the start, and two runs
    # that never train are identical whatever the code does.
    calibration = {"budget": 2.0, "reg_weight": 0.05, "max_steps": 10}
    document = expert_config(tiny, method="expert_merging_pp", calibration=calibration)
    config = write_config(tmp_path / "merge.yml", document)
    first, second = tmp_path / "a", tmp_path / "b"
    assert run_cli(config, str(first)).exit_code == 0
    assert run_cli(config, str(second)).exit_code == 0
    trained = read_report(first)
    for stage in ("stage1", "stage2"):
        history = trained[stage]
        assert history["objective"][history["kept_epoch"]] < history["objective"][0]
    a, b = read_coefficients(first), read_coefficients(second)
    assert a.keys() == b.keys()
    for name in a:  # bit for bit, not merely close
        assert a[name].numpy().tobytes() == b[name].numpy().tobytes(), name
    report = read_report(first)
    assert set(report["versions"]) == {
        "mergekit_expert",
        "mergekit",
        "torch",
        "transformers",
    }


def test_pickle_checkpoints_need_an_explicit_flag(tiny, tmp_path):
    import shutil

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny.experts[0], pickled)
    tensors = load_file(str(pickled / "model.safetensors"))
    os.remove(pickled / "model.safetensors")
    torch.save(tensors, pickled / "pytorch_model.bin")  # a legacy pickle checkpoint
    document = expert_config(tiny, lora=False)
    document["models"][0]["model"] = str(pickled)
    config = write_config(tmp_path / "merge.yml", document)
    result = invoke(config, tmp_path / "out")
    assert result.exit_code != 0
    assert "pytorch_model.bin" in result.output and "--allow-pickle" in result.output
    assert not (tmp_path / "out").exists()


def test_a_lora_merge_cut_short_is_redone(tiny, tmp_path):
    """mergekit reuses any folder of its LoRA cache that exists; a run killed
    while merging an adapter must not resume from the half-written model."""
    from mergekit.options import MergeOptions

    from mergekit_expert.calibrate import FINISHED, local_models
    from mergekit_expert.config import parse_plan
    from mergekit_expert.output import WorkDir

    plan = parse_plan(expert_config(tiny))
    work = WorkDir(str(tmp_path / "out"), "fingerprint")
    work.open()
    _, experts = local_models(plan, MergeOptions(), work.file("lora"), work)
    merged = experts[2]  # the base+adapter expert
    assert merged.startswith(work.file("lora"))
    weights = [n for n in os.listdir(merged) if n.endswith(".safetensors")]
    expected = {  # copies: load_file maps the file, which is truncated below
        n: {k: t.clone() for k, t in load_file(os.path.join(merged, n)).items()}
        for n in weights
    }
    # Killed while saving: the folder is there, the weights are not whole.
    os.remove(merged + FINISHED)
    with open(os.path.join(merged, weights[0]), "r+b") as handle:
        handle.truncate(100)
    _, again = local_models(plan, MergeOptions(), work.file("lora"), work)
    assert again[2] == merged
    for name, tensors in expected.items():
        redone = load_file(os.path.join(merged, name))
        assert all(torch.equal(tensors[k], redone[k]) for k in tensors)
    # A user's --lora-merge-cache is never cleaned.
    user_cache = tmp_path / "user-cache"
    (user_cache / "theirs").mkdir(parents=True)
    (user_cache / "theirs" / "config.json").write_text("{}")
    local_models(plan, MergeOptions(), str(user_cache), work)
    assert (user_cache / "theirs" / "config.json").read_text() == "{}"
    work.close()
