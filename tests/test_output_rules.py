"""OUT can never destroy a user's files: refused locations, foreign folders, the lock.

Every refusal is checked the same way: the run exits non-zero with an
``Error:`` line naming the problem, and every file that existed before is
still there, byte for byte (hashed), with no OUT or OUT.partial created.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit_expert import output as output_module
from mergekit_expert.errors import ExpertMergingError
from mergekit_expert.output import (
    WorkDir,
    check_output_location,
    why_not_replaceable,
)
from mergekit_expert.testing.cli import (
    invoke,
    run_process,
    start_process,
    wait_for_checkpoint,
    write_config,
)


def digest(root) -> dict[str, str]:
    """Every file and folder under root (symlinks as their targets' names)."""
    found = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root) + "/"] = (
                "link:" + os.readlink(path) if os.path.islink(path) else "dir"
            )
        for name in names:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                found[os.path.relpath(path, root)] = "link:" + os.readlink(path)
            elif not os.path.isfile(path):
                found[os.path.relpath(path, root)] = "special"  # a FIFO: never opened
            else:
                with open(path, "rb") as handle:
                    found[os.path.relpath(path, root)] = hashlib.sha256(
                        handle.read()
                    ).hexdigest()
    return found


@pytest.fixture
def project(tiny, tmp_path, monkeypatch):
    """A user's project folder: models, data, a config and notes; cwd inside it."""
    root = tmp_path / "project"
    (root / "models").mkdir(parents=True)
    (root / "data").mkdir()
    shutil.copytree(tiny.base, root / "models" / "base")
    for name, source in zip(("code", "math"), tiny.experts):
        shutil.copytree(source, root / "models" / name)
    for name, source in zip(("code", "math"), tiny.calibration):
        shutil.copy(source, root / "data" / f"{name}.jsonl")
    (root / "notes.txt").write_text("my experiment notes\n")
    document = {
        "merge_method": "expert_merging",
        "base_model": "models/base",
        "models": [
            {"model": "models/code", "parameters": {"calibration": "data/code.jsonl"}},
            {"model": "models/math", "parameters": {"calibration": "data/math.jsonl"}},
        ],
        "dtype": "float32",
        # A fixed reg_weight and a few steps: these tests check what a run
        # writes and refuses, not how well it calibrates (test_optimizer).
        "calibration": {
            "samples_per_expert": 3,
            "init": 0.3,
            "reg_weight": 0.05,
            "max_steps": 10,
        },
    }
    (root / "merge.yml").write_text(yaml.safe_dump(document))
    monkeypatch.chdir(root)
    return root


def refused(root, out, *args, config="merge.yml") -> str:
    """Run, expect an Error line, and check that nothing under root changed."""
    before = digest(root)
    result = invoke(config, str(out), *args)
    assert result.exit_code != 0, result.output
    assert "Error:" in result.output, result.output
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), result.exception
    assert digest(root) == before, "a refused run must not write or remove anything"
    return result.output


def test_out_is_the_working_directory(project):
    output = refused(project, ".")
    assert "is the current directory" in output and "./merged" in output


def test_out_is_an_expert_directory(project):
    output = refused(project, "models/math")
    assert "is expert models/math" in output


def test_out_inside_an_expert_directory(project):
    output = refused(project, "models/math/merged")
    assert "lies inside expert models/math" in output


def test_out_contains_the_calibration_file_and_config(project):
    output = refused(project, "data")
    assert "contains the calibration data of models/code data/code.jsonl" in output
    output = refused(project.parent, str(project))
    assert "contains" in output


def test_out_is_a_symlink_to_an_input(project):
    os.symlink(project / "models" / "code", project / "link")
    output = refused(project, "link")
    assert "symbolic link" in output
    output = refused(project, "link/sub")  # resolved through the link
    assert "lies inside expert models/code" in output


def test_out_is_home_or_contains_it(project, monkeypatch):
    monkeypatch.setenv("HOME", str(project.parent / "home" / "user"))
    os.makedirs(project.parent / "home" / "user")
    output = refused(project.parent, str(project.parent / "home"))
    assert "contains your home directory" in output
    with pytest.raises(ExpertMergingError, match="filesystem root"):
        check_output_location("/", [])


def test_out_contains_the_coefficients_artifact(project):
    assert invoke("merge.yml", "merged").exit_code == 0
    artifact = "merged/expert_merging/coefficients.safetensors"
    output = refused(project, "merged", "--coefficients", artifact)
    assert "contains the coefficients artifact" in output


def test_foreign_folder_needs_overwrite(project):
    out = project / "results"
    out.mkdir()
    (out / "summary.csv").write_text("a,b\n1,2\n")
    output = refused(project, "results")
    assert "summary.csv" in output and "--overwrite" in output
    result = invoke("merge.yml", "results", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "summary.csv").exists()
    assert (out / "expert_merging" / "coefficients.safetensors").exists()


def test_previous_output_is_replaced_at_the_end(project):
    # OUT is named like an entry of its working directory (OUT.partial/previous
    # holds the replaced OUT for a moment): the staged output must not collide.
    out = "previous"
    assert invoke("merge.yml", out).exit_code == 0
    assert why_not_replaceable(out) is None
    first = load_file(f"{out}/expert_merging/coefficients.safetensors")
    document = yaml.safe_load(open("merge.yml"))
    document["calibration"]["init"] = 0.6
    write_config(project / "other.yml", document)
    assert invoke("other.yml", out).exit_code == 0
    second = load_file(f"{out}/expert_merging/coefficients.safetensors")
    report = json.load(open(f"{out}/expert_merging/report.json"))
    assert report["init"] == pytest.approx([0.6, 0.6])
    assert any(not torch.equal(first[n], second[n]) for n in first)
    assert not os.path.exists(f"{out}.partial")
    # The same output copied elsewhere (or downloaded) is not this path's.
    shutil.copytree(project / out, project / "copied")
    assert "no expert_merging/output.json naming" in refused(project, "copied")
    # A file the user added to the output makes it foreign again, also inside
    # expert_merging/.
    (project / out / "expert_merging" / "notes.txt").write_text("my notes")
    assert "expert_merging/notes.txt" in refused(project, out, config="other.yml")
    (project / out / "eval.txt").write_text("my scores")
    assert "eval.txt" in refused(project, out, config="other.yml")


def test_a_model_folder_is_not_a_previous_output(project):
    """A folder from save_pretrained holds only names a merge writes too; it is
    replaced only with --overwrite."""
    shutil.copytree(project / "models" / "code", project / "other_model")
    output = refused(project, "other_model")
    assert "no expert_merging/output.json naming" in output and "--overwrite" in output


def staged(work: WorkDir, text: str) -> None:
    """Stand in for a finished merge: one file in the staged output, recorded."""
    os.makedirs(work.staging)
    with open(os.path.join(work.staging, "config.json"), "w") as handle:
        handle.write(text)
    work.record_output()


def published(out: str, text: str) -> None:
    work = WorkDir(out, "fingerprint")
    work.open()
    staged(work, text)
    work.publish()


def test_checks_and_writes_resolve_out_alike(project):
    """`current/../mywork` is runs/mywork for the kernel (.. follows the
    symlink); a lexical reading would check one folder and replace another."""
    (project / "runs" / "v3").mkdir(parents=True)
    os.symlink(project / "runs" / "v3", project / "current")
    (project / "mywork").mkdir()
    (project / "mywork" / "thesis.tex").write_text("\\chapter{}")
    before = digest(project / "mywork")
    out = os.path.join("current", "..", "mywork")
    assert why_not_replaceable(out) is None  # runs/mywork does not exist
    published(out, "{}")
    assert (project / "runs" / "mywork" / "config.json").read_text() == "{}"
    assert digest(project / "mywork") == before
    assert why_not_replaceable(out) is None  # the output it wrote there


def test_out_changed_during_the_run_is_left_alone(project):
    published("merged", "first")
    work = WorkDir("merged", "fingerprint")
    work.open()
    staged(work, "second")
    (project / "merged" / "eval.txt").write_text("written while the run went on")
    before = digest(project / "merged")
    with pytest.raises(ExpertMergingError, match="changed during the run.*eval.txt"):
        work.publish()
    work.close()
    assert digest(project / "merged") == before


def test_interrupted_publish_restores_the_old_output(project, monkeypatch):
    published("merged", "first")
    before = digest(project / "merged")
    # The second rename fails: the old OUT goes back at once.
    work = WorkDir("merged", "fingerprint")
    work.open()
    staged(work, "second")
    real_replace = os.replace

    def failing(src, dst):
        if src == work.staging:
            raise OSError(28, "No space left on device (injected)")
        real_replace(src, dst)

    monkeypatch.setattr(output_module.os, "replace", failing)
    with pytest.raises(OSError):
        work.publish()
    monkeypatch.setattr(output_module.os, "replace", real_replace)
    work.close()
    assert digest(project / "merged") == before
    # Killed between the renames: the next run puts the old OUT back.
    os.replace(project / "merged", work.file("previous"))
    assert not os.path.exists(project / "merged")
    again = WorkDir("merged", "fingerprint")
    again.open()
    again.close()
    assert digest(project / "merged") == before
    # The same, and then a script made an empty OUT: the old one comes back.
    os.makedirs(again.path, exist_ok=True)
    os.replace(project / "merged", again.file("previous"))
    (project / "merged").mkdir()
    again = WorkDir("merged", "fingerprint")
    again.open()
    again.close()
    assert digest(project / "merged") == before
    # OUT holds something else: neither is touched, and the error says so.
    os.replace(project / "merged", again.file("previous"))
    (project / "merged").mkdir()
    (project / "merged" / "new.txt").write_text("not a merge")
    with pytest.raises(ExpertMergingError, match="move one of them away"):
        WorkDir("merged", "fingerprint").open()
    assert (project / "merged" / "new.txt").exists()
    # Dropping the working directory keeps it while it holds the old OUT.
    stuck = WorkDir("merged", "fingerprint")
    stuck.remove()
    assert digest(project / "merged.partial" / "previous") == before


def test_partial_folder_that_is_not_ours(project):
    os.makedirs(project / "merged.partial")
    (project / "merged.partial" / "thesis.tex").write_text("\\chapter{}")
    output = refused(project, "merged")
    assert "merged.partial" in output and "not made by mergekit-expert" in output
    # A file of the marker's name is not the marker.
    (project / "merged.partial" / "fingerprint.json").write_text('{"a": 1}')
    assert "not made by mergekit-expert" in refused(project, "merged")


def test_symlinked_partial_folder(project):
    os.makedirs(project / "elsewhere")
    os.symlink(project / "elsewhere", project / "merged.partial")
    output = refused(project, "merged")
    assert "merged.partial is a symbolic link" in output


def test_plain_methods_follow_the_same_rules(project):
    document = {
        "merge_method": "task_arithmetic",
        "base_model": "models/base",
        "models": [
            {"model": "models/code", "parameters": {"weight": 0.5}},
            {"model": "models/math", "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    }
    write_config(project / "ta.yml", document)
    assert "is the current directory" in refused(project, ".", config="ta.yml")
    assert "is model models/math" in refused(project, "models/math", config="ta.yml")
    # A folder read only for its tokenizer is an input too, even with --overwrite.
    shutil.copytree(project / "models" / "base", project / "tokenizer_model")
    write_config(
        project / "tok.yml", {**document, "tokenizer_source": "tokenizer_model"}
    )
    output = refused(project, "tokenizer_model", "--overwrite", config="tok.yml")
    assert "is the tokenizer_source model tokenizer_model" in output
    assert invoke("ta.yml", "ta_out").exit_code == 0
    assert (project / "ta_out" / "mergekit_config.yml").exists()
    assert not os.path.exists("ta_out.partial")
    # Written exactly as mergekit-yaml writes it, so with no record of ours:
    # replaced only when told to.
    assert "--overwrite" in refused(project, "ta_out", config="ta.yml")
    assert invoke("ta.yml", "ta_out", "--overwrite").exit_code == 0


def test_second_run_on_the_same_out_is_refused(project):
    document = yaml.safe_load(open("merge.yml"))
    # Settings where training moves the coefficients (checked below).
    document["calibration"]["reg_weight"] = 0.0
    write_config(project / "long.yml", document)
    reference = invoke("long.yml", "reference")
    assert reference.exit_code == 0, reference.output
    first = start_process(["long.yml", "merged"], stderr=subprocess.PIPE)
    try:
        wait_for_checkpoint(first, project / "merged")  # it holds the lock now
        # Stopped, the first run keeps holding the lock however fast it would
        # otherwise finish: the second run certainly starts while it is held.
        first.send_signal(signal.SIGSTOP)
        started = time.time()
        result = invoke("merge.yml", "merged")  # another config, same OUT
        assert time.time() - started < 30, "the second run must fail at once"
        assert result.exit_code != 0
        assert f"another mergekit-expert run (pid {first.pid})" in result.output
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=600) == 0, first.stderr.read().decode()
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGKILL)
    expected = load_file("reference/expert_merging/coefficients.safetensors")
    got = load_file("merged/expert_merging/coefficients.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert any((t - 0.3).abs().max() > 1e-4 for t in got.values()), "it trained"


# --- every item of the adversarial list: message, nothing written or lost ---


def write_artifact(path, values, method="expert_merging") -> str:
    """An artifact written byte by byte as a damaged or edited one would be."""
    from safetensors.torch import save_file

    base = load_file("models/base/model.safetensors")
    names = [n for n in base if n.endswith("proj.weight")]
    metadata = {
        "format": "mergekit-expert/1",
        "method": method,
        "base": "models/base",
        "experts": json.dumps(["models/code", "models/math"]),
        "init": json.dumps([0.3, 0.3]),
    }
    save_file({n: values(n) for n in names}, str(path), metadata=metadata)
    return str(path)


@pytest.mark.parametrize(
    "values, method, message",
    [
        (
            lambda n: torch.full((2, 1), float("nan")),
            "expert_merging",
            "NaN or infinite",
        ),
        (
            lambda n: torch.full((2, 1), float("inf")),
            "expert_merging",
            "NaN or infinite",
        ),
        (lambda n: torch.ones(2, 1, dtype=torch.int64), "expert_merging", "int64"),
        (lambda n: torch.ones(2, 0), "expert_merging", "shape [2, 0]"),
        (lambda n: torch.full((2, 1000), 0.3), "expert_merging_pp", "1000 chunk"),
        (lambda n: torch.full((2, 3), 0.3), "expert_merging", "3 chunks"),
        (lambda n: torch.full((2, 1), 0.3), "ties", "made by method 'ties'"),
        (lambda n: torch.full((2, 1), 0.3), "expert_merging_pp", "use merge_method"),
    ],
)
def test_bad_coefficients_artifact(project, tmp_path, values, method, message):
    path = write_artifact(tmp_path / "bad.safetensors", values, method)
    if "1000" in message:  # a ++ artifact under a ++ config, wrong chunk count
        document = yaml.safe_load(open("merge.yml"))
        document["merge_method"] = "expert_merging_pp"
        write_config(project / "pp.yml", document)
        output = refused(project, "merged", "--coefficients", path, config="pp.yml")
    else:
        output = refused(project, "merged", "--coefficients", path)
    assert message in output, output
    assert not os.path.exists("merged")


def test_report_json_is_strict():
    from mergekit_expert.report import finite_json

    cleaned = finite_json({"a": [1.0, float("nan")], "b": {"c": float("inf")}})
    assert cleaned == {"a": [1.0, None], "b": {"c": None}}
    json.dumps(cleaned, allow_nan=False)


def fake_hub_cache(root, repo: str, source: str, pickle_only: bool) -> str:
    """A Hugging Face cache entry for ``repo`` holding a copy of ``source``."""
    folder = root / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / ("0" * 40)
    shutil.copytree(source, snapshot)
    if pickle_only:
        tensors = load_file(str(snapshot / "model.safetensors"))
        os.remove(snapshot / "model.safetensors")
        torch.save(tensors, snapshot / "pytorch_model.bin")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    return str(root)


def test_pickle_rule_applies_to_hub_models(project, tmp_path):
    cache = fake_hub_cache(tmp_path / "hub", "acme/pickled", "models/math", True)
    document = yaml.safe_load(open("merge.yml"))
    document["models"][1]["model"] = "acme/pickled"
    write_config(project / "hub.yml", document)
    before = digest(project)
    result = run_process(["hub.yml", "merged"], {"HF_HUB_CACHE": cache})
    assert result.returncode != 0
    assert "Error:" in result.stderr and "Traceback" not in result.stderr
    assert "pytorch_model.bin" in result.stderr and "--allow-pickle" in result.stderr
    assert digest(project) == before
    # Not in the cache at all, with the hub offline: named, with the fix.
    document["models"][1]["model"] = "acme/missing"
    write_config(project / "hub.yml", document)
    result = run_process(["hub.yml", "merged"], {"HF_HUB_CACHE": cache})
    assert "acme/missing" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert "Traceback" not in result.stderr


def damage(path, how):
    data = open(path, "rb").read()
    if how == "truncated":
        data = data[:-100]
    elif how == "garbage":
        data = b"not a safetensors file" * 10
    else:  # the header lies about a shape
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        name = next(k for k in header if k != "__metadata__")
        header[name]["shape"] = [s + 1 for s in header[name]["shape"]]
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        data = len(text).to_bytes(8, "little") + text + data[8 + size :]
    open(path, "wb").write(data)


@pytest.mark.parametrize("how", ["truncated", "garbage", "shape"])
def test_damaged_safetensors_in_an_expert(project, how):
    damage(project / "models" / "math" / "model.safetensors", how)
    output = refused(project, "merged")
    assert "models/math/model.safetensors is not a valid safetensors file" in output


def test_deeply_nested_json_record(project):
    (project / "data" / "code.jsonl").write_text("[" * 100000 + "]" * 100000 + "\n")
    output = refused(project, "merged")
    assert "code.jsonl:1" in output and "nested too deeply" in output


def test_lone_surrogate_in_a_record(project):
    with open(project / "data" / "code.jsonl", "a") as handle:
        handle.write('{"text": "broken \\ud800 text"}\n')
    document = yaml.safe_load(open("merge.yml"))
    document["calibration"]["samples_per_expert"] = 4
    write_config(project / "four.yml", document)
    output = refused(project, "merged", config="four.yml")
    assert "code.jsonl:4" in output and "unpaired surrogate" in output


def test_output_parent_is_a_file(project):
    output = refused(project, "notes.txt/merged")
    assert (
        "cannot create the working directory" in output and "Not a directory" in output
    )


def test_disk_full_during_the_write_keeps_the_state(project):
    """A real write failure: the file-size limit (EFBIG) stops the model write."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (120_000, 120_000))

    before = digest(project)
    result = run_process(["merge.yml", "merged"], preexec_fn=limit, timeout=300)
    assert result.returncode != 0
    assert "Error:" in result.stderr and "Traceback" not in result.stderr
    assert "run the same command again" in result.stderr
    assert os.path.exists("merged.partial/checkpoint.safetensors"), "state is kept"
    assert not os.path.exists("merged")
    after = {k: v for k, v in digest(project).items() if not k.startswith("merged.")}
    assert after == before
    result = invoke("merge.yml", "merged")  # no limit: resumes and finishes
    assert result.exit_code == 0, result.output
    assert json.load(open("merged/expert_merging/report.json"))["resumed"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "the config is empty"),
        ("- a\n- b\n", "must be a YAML mapping"),
        ("merge_method: tiess\nmodels: []\n", "did you mean 'ties'"),
        ("merge_method: [", "invalid YAML"),
    ],
)
def test_bad_config_files(project, text, message):
    (project / "bad.yml").write_text(text)
    output = refused(project, "merged", config="bad.yml")
    assert message in output


def test_fifo_calibration_file_does_not_hang(project):
    os.remove(project / "data" / "code.jsonl")
    os.mkfifo(project / "data" / "code.jsonl")
    before = digest(project)
    result = run_process(["merge.yml", "merged"], timeout=60)
    assert result.returncode != 0 and "not a regular file" in result.stderr
    assert "Traceback" not in result.stderr and digest(project) == before


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lr", float("inf"), "calibration.lr"),
        ("init", float("nan"), "calibration.init"),
        ("learning_rate", 0.1, "did you mean 'lr'"),
        ("gamma", 0.1, "did you mean 'reg_weight'"),
    ],
)
def test_bad_calibration_values(project, key, value, message):
    document = yaml.safe_load(open("merge.yml"))
    document["calibration"][key] = value
    write_config(project / "bad.yml", document)
    assert message in refused(project, "merged", config="bad.yml")


def test_cuda_without_cuda(project):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    output = refused(project, "merged", "--cuda")
    assert "sees no CUDA GPU" in output


def test_filesystem_without_locks_is_refused(project, monkeypatch):
    import errno

    from mergekit_expert import output

    def no_locks(fd, operation):  # what flock does on some network mounts
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(output.fcntl, "flock", no_locks)
    before = digest(project)
    result = invoke("merge.yml", "merged")
    assert result.exit_code != 0 and "Error:" in result.output
    assert "does not support the lock" in result.output, result.output
    assert "local filesystem" in result.output
    assert digest(project) == before, "a refused run must not write or remove anything"
