"""Memory-lean calibration gives the same coefficients as the plain one."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from mergekit_expert.task_vectors import TIERS, load_task_vectors, pick_tier
from mergekit_expert.testing.cli import (
    read_coefficients,
    read_report,
    run_document,
    write_config,
)
from mergekit_expert.testing.tiny import expert_config

# reg_weight 0.05: at 0.8 these noise experts keep the start (the optimum), and
# two runs that never train would be equal whatever the code does. max_steps
# 10: over 40 prox steps of ++ the line search's accept / grow decisions turn
# float summation-order differences (streamed vs resident, 2 ranks vs 1) into
# coefficient differences of up to 2e-5, above the tolerance these tests hold.
SETTINGS = {"epochs": 2, "budget": 2.0, "reg_weight": 0.05, "max_steps": 10}


def trained(report) -> None:
    """Every stage's kept objective is below its start; the alphas moved."""
    for stage in ("stage1", "stage2"):
        if stage in report:
            history = report[stage]
            assert history["objective"][history["kept_epoch"]] < history["objective"][0]
    assert report["outcome"]["moved"]


def calibrate(tiny, tmp_path, name, method="expert_merging_pp", **calibration):
    document = expert_config(
        tiny, method=method, calibration={**SETTINGS, **calibration}
    )
    run = run_document(tmp_path, document, name=name)
    trained(run.report)
    return run.coefficients, run.report


def assert_same(a, b, **tolerance):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tolerance)


def test_every_tier_equals_resident(tiny, tmp_path):
    """Same coefficients to 1e-5 (the projection sums in another order; ten
    steps of the line search carry that rounding to about 1e-6 absolute)."""
    resident, report = calibrate(tiny, tmp_path, "resident", task_vectors="resident")
    assert report["task_vectors"] == "resident"
    for tier in ("compact", "host", "streamed"):
        other, report = calibrate(tiny, tmp_path, tier, task_vectors=tier)
        assert report["task_vectors"] == tier
        assert_same(resident, other, rtol=1e-5, atol=1e-5)


def _tier(mode, checkpoints):
    """The task vectors of every projection of ``checkpoints`` (base, experts)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoints[0], dtype=torch.float32)
    params = dict(model.named_parameters())
    names = [n for n in params if n.endswith("proj.weight")]
    experts = list(checkpoints[1:])
    return load_task_vectors(
        mode,
        names,
        params,
        checkpoints[0],
        experts,
        [str(i) for i in range(len(experts))],
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tiers_hand_out_the_same_float32_values(tiny, tmp_path, dtype):
    """tau = float32(expert) - float32(base) in every tier: bit for bit, so
    storing the checkpoint dtype (compact, host) adds no error at all."""
    from transformers import AutoModelForCausalLM

    checkpoints = []
    for index, path in enumerate([tiny.base, *tiny.experts]):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        checkpoints.append(str(tmp_path / f"model{index}"))
        model.save_pretrained(checkpoints[-1])
    tiers = {mode: _tier(mode, checkpoints) for mode in TIERS}
    cpu = torch.device("cpu")
    reference = tiers["resident"]
    stored = tiers["compact"]._blocks  # base and experts as the files hold them
    assert {b.dtype for b in stored.values()} == {dtype}
    # Independently: the files' values, upcast, subtracted.
    files = [load_file(f"{c}/model.safetensors") for c in checkpoints]
    for name in reference.names:
        base = reference.base(name, cpu)
        rows = list(reference.rows(name, cpu))
        flat = [f[name].reshape(-1).to(torch.float32) for f in files]
        assert torch.equal(base, flat[0])
        for k, row in enumerate(rows):
            assert torch.equal(row, flat[k + 1] - flat[0])
        for mode in ("compact", "host", "streamed"):
            assert torch.equal(tiers[mode].base(name, cpu), base), (mode, name)
            for mine, theirs in zip(tiers[mode].rows(name, cpu), rows, strict=True):
                assert torch.equal(mine, theirs), (mode, name)
    # One pass over every tensor reads (K + 1) x numel x element bytes in the
    # checkpoint-dtype tiers, the float32 bytes when resident.
    numel = sum(reference.numel(n) for n in reference.names)
    size = torch.tensor([], dtype=dtype).element_size()
    for mode in TIERS:
        tiers[mode].bytes_read = 0
        for name in reference.names:
            list(tiers[mode].rows(name, cpu))
        expected = 3 * numel * (4 if mode == "resident" else size)
        if mode == "resident":
            expected = 2 * numel * 4  # tau rows only: the base is not re-read
        assert tiers[mode].bytes_read == expected, mode


GIB = 2**30


@pytest.mark.parametrize(
    "experts, device_free, host_free, gpu, tier",
    [
        # 7B (N_c = 7.0e9) in bf16 on one GPU with 256 GiB of free host memory:
        # resident (K + 1) N_c 4, compact (K + 1) N_c 2, against half the free.
        (3, 78 * GIB, 256 * GIB, True, "host"),  # 80 GB: 104 / 52 GiB > 39
        (3, 139 * GIB, 256 * GIB, True, "compact"),  # 141 GB: 52 GiB < 69.5
        (8, 139 * GIB, 256 * GIB, True, "host"),  # 117 GiB > 69.5, < 128
        (8, 78 * GIB, 200 * GIB, True, "streamed"),  # 117 GiB > 100 of host
        (3, 600 * GIB, 1000 * GIB, True, "resident"),  # 104 GiB < 300
        (3, 120 * GIB, 120 * GIB, False, "compact"),  # CPU: 52 < 60 < 104
        (3, 80 * GIB, 80 * GIB, False, "streamed"),  # CPU: no host tier
    ],
)
def test_auto_picks_the_fastest_tier_that_fits(
    experts, device_free, host_free, gpu, tier
):
    numel = 7_000_000_000
    chosen, why = pick_tier(experts, numel, 2, device_free, host_free, gpu)
    assert chosen == tier, why
    # Float32 checkpoints have nothing compact to offer.
    if tier == "compact":
        assert pick_tier(experts, numel, 4, device_free, host_free, gpu)[0] != "compact"


def test_top_k_cache_with_full_vocabulary_equals_full_cache(tiny, tmp_path):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny.base).vocab_size
    full, _ = calibrate(tiny, tmp_path, "full", method="expert_merging")
    top, report = calibrate(
        tiny, tmp_path, "top", method="expert_merging", teacher_top_k=vocab
    )
    assert report["calibration"]["teacher_top_k"] == vocab
    assert_same(full, top, rtol=1e-5, atol=1e-6)


def test_top_k_loss_is_renormalized_over_the_kept_tokens():
    from mergekit_expert.objective import logit_loss

    generator = torch.Generator().manual_seed(0)
    teacher, student = (
        torch.randn(5, 11, generator=generator),
        torch.randn(5, 11, generator=generator),
    )
    values, indices = teacher.topk(11, dim=-1)
    torch.testing.assert_close(
        logit_loss(student, values, 2.0, indices=indices),
        logit_loss(student, teacher, 2.0),
    )
    values, indices = teacher.topk(3, dim=-1)
    p = torch.softmax(values, -1)
    q = torch.softmax(student.gather(-1, indices), -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(logit_loss(student, values, indices=indices), expected)


def test_device_map_and_gradient_checkpointing_match_the_plain_run(tiny, tmp_path):
    plain, _ = calibrate(tiny, tmp_path, "plain", method="expert_merging")
    shards = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    mapped, _ = calibrate(
        tiny, tmp_path, "mapped", method="expert_merging", device_map=shards
    )
    assert_same(plain, mapped, rtol=1e-5, atol=1e-6)
    checkpointed, _ = calibrate(
        tiny,
        tmp_path,
        "checkpointed",
        method="expert_merging",
        gradient_checkpointing=True,
    )
    assert_same(plain, checkpointed, rtol=1e-5, atol=1e-6)


def torchrun_two_processes(config, out) -> None:
    """``torchrun --standalone --nproc_per_node=2 -m mergekit_expert CONFIG OUT``;
    a failure shows the processes' output (torchrun's own exit status says
    nothing of the cause)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        + ["--nproc_per_node=2", "-m", "mergekit_expert", str(config), str(out)]
        + ["--quiet"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (
        f"torchrun exited with {done.returncode}\n"
        f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-8000:]}"
    )


def test_torchrun_two_processes_equal_one_process(tiny, tmp_path):
    single, _ = calibrate(tiny, tmp_path, "single")
    document = expert_config(tiny, method="expert_merging_pp", calibration=SETTINGS)
    config = write_config(tmp_path / "ddp.yml", document)
    out = tmp_path / "ddp"
    torchrun_two_processes(config, out)
    parallel = read_coefficients(out)
    # The gathered sums round differently: 1e-6 absolute after ten line-search
    # steps (on a coefficient near 0), as between the task-vector tiers.
    assert_same(single, parallel, rtol=1e-5, atol=1e-5)
    report = read_report(out)
    trained(report)
    assert report["world_size"] == 2
    # Rank 1 scored its own samples; their pseudo-labels reach rank 0's report.
    assert sorted(p["expert"] for p in report["pseudo_labels"]) == [1, 1, 2]
    assert not os.path.exists(str(out) + ".partial")
    assert sorted(os.listdir(tmp_path)).count("ddp") == 1


def test_torchrun_reg_weight_auto_equals_one_process(tiny, tmp_path):
    """The held-out path on 2 ranks (each scores its own samples; the
    per-sample losses are gathered) gives one process's losses, errors and
    choice."""
    auto = {"reg_weight": "auto", "reg_grid": [0.8, 0.05, 0.0], "epochs": 1}
    _, single = calibrate(tiny, tmp_path, "single", method="expert_merging", **auto)
    document = expert_config(
        tiny, method="expert_merging", calibration={**SETTINGS, **auto}
    )
    config = write_config(tmp_path / "ddp.yml", document)
    out = tmp_path / "ddp"
    torchrun_two_processes(config, out)
    ours, theirs = single["reg_weight_selection"], read_report(out)
    assert theirs["world_size"] == 2
    theirs = theirs["reg_weight_selection"]
    # The path moved (otherwise every point would be equal whatever the code).
    assert len(set(ours["held_out_alignment"])) == 3
    assert theirs["held_out_alignment"] == pytest.approx(
        ours["held_out_alignment"], rel=1e-5, abs=1e-7
    )
    # A standard error is a spread of per-sample differences of losses near
    # 7: its rounding is theirs (1e-5 of the loss), not 1e-5 of itself (one
    # process on 1 or 2 threads already differs by 2e-6).
    scale = max(ours["held_out_alignment"])
    assert theirs["standard_error"] == pytest.approx(
        ours["standard_error"], abs=1e-5 * scale
    )
    assert (theirs["reg_weight"], theirs["lowest"]) == (
        ours["reg_weight"],
        ours["lowest"],
    )
