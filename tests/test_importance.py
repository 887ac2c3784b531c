"""Expert Merging++: importance, chunk allocation and stage 2, against hand derivations."""

import math
import os
import random

import pytest
import torch
from safetensors import safe_open

from mergekit_expert.importance import allocate_chunks, layer_importance
from mergekit_expert.task_vectors import ResidentTaskVectors
from mergekit_expert.testing.cli import read_model, run_document
from mergekit_expert.testing.oracles import expected_model
from mergekit_expert.testing.tiny import expert_config


def constant_magnitude(values, numel, seed):
    """Task vectors whose entries are +-value, so mean|tau| is exactly value."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (len(values), numel), generator=generator) * 2 - 1
    return signs.double() * torch.tensor(values, dtype=torch.float64)[:, None]


def test_hand_worked_importance_and_allocation():
    # Three tensors, two experts.
    numel = {"A": 4, "B": 8, "C": 12}
    mean_abs = {"A": [1.0, 0.2], "B": [0.5, 0.2], "C": [0.25, 0.6]}
    alpha = {"A": [0.5, 0.2], "B": [0.4, 0.6], "C": [0.3, 0.1]}
    task_vectors = {
        n: constant_magnitude(mean_abs[n], numel[n], i) for i, n in enumerate(numel)
    }
    alphas = {n: torch.tensor(alpha[n], dtype=torch.float64)[:, None] for n in numel}

    # s_k(l) = mean|tau_k(l)| / sum_l mean|tau_k(l)|: expert 0's sum is 1.75, so
    # its s are 1/1.75 = 4/7, 0.5/1.75 = 2/7 and 0.25/1.75 = 1/7; expert 1's sum
    # is 1.0, so its s are 0.2, 0.2 and 0.6. raw(l) = sum_k alpha_k(l) s_k(l) n(l):
    #   A = (0.5 * 4/7 + 0.2 * 0.2) * 4  = (2/7  + 1/25) * 4  = 57/175 * 4  = 228/175
    #   B = (0.4 * 2/7 + 0.6 * 0.2) * 8  = (4/35 + 3/25) * 8  = 41/175 * 8  = 328/175
    #   C = (0.3 * 1/7 + 0.1 * 0.6) * 12 = (3/70 + 3/50) * 12 = 18/175 * 12 = 216/175
    # The total is 772/175, so I = 228/772, 328/772, 216/772 = 57/193, 82/193, 54/193.
    expected_importance = {"A": 57 / 193, "B": 82 / 193, "C": 54 / 193}

    vectors = ResidentTaskVectors(
        {n: torch.zeros(numel[n]) for n in numel}, task_vectors
    )
    importance = layer_importance(alphas, vectors.mean_abs(), numel)
    for n in numel:
        assert math.isclose(importance[n], expected_importance[n], rel_tol=1e-6)

    # m(l) = floor(B * I(l)^kappa / sum_j I(j)^kappa) with B = budget * 3 tensors,
    # and I proportional to 57 : 82 : 54:
    #   budget 2, kappa 1.2 (the default kappa): B = 6; 57^1.2, 82^1.2, 54^1.2 are
    #     127.953, 197.960, 119.915 (sum 445.827), so B * share = 1.722, 2.664, 1.614
    #   budget 1, kappa 1: B = 3; 3 * 57/193, 3 * 82/193, 3 * 54/193 = 0.886, 1.275, 0.839
    #   budget 3, kappa 2: B = 9; 57², 82², 54² = 3249, 6724, 2916 (sum 12889), so
    #     9 * 3249/12889, 9 * 6724/12889, 9 * 2916/12889 = 2.269, 4.695, 2.036
    #   budget 1, kappa 0: B = 3; every I^0 is 1, so 3 * 1/3 = 1 each
    # Every count is one torch.chunk really gives (4 elements in 2 chunks of 2,
    # 8 in 2 of 4 or 4 of 2, 12 in 2 of 6), so none is clipped.
    cases = {
        (2.0, 1.2): (6.0, {"A": 1, "B": 2, "C": 1}),
        (1.0, 1.0): (3.0, {"A": 0, "B": 1, "C": 0}),
        (3.0, 2.0): (9.0, {"A": 2, "B": 4, "C": 2}),
        (1.0, 0.0): (3.0, {"A": 1, "B": 1, "C": 1}),
    }
    for (budget, kappa), (big_b, expected) in cases.items():
        allocation = allocate_chunks(importance, numel, budget, kappa)
        assert allocation.chunks == expected, (budget, kappa)
        assert allocation.budget == big_b

    # Largest remainder: the floors above, plus one chunk for each of the
    # round(B) - sum(floors) weights with the largest fractional parts:
    #   budget 2, kappa 1.2: floors 1, 2, 1 (4 of 6); remainders .722, .664,
    #     .614, so A and B get one more: 2, 3, 1
    #   budget 1, kappa 1: floors 0, 1, 0 (1 of 3); remainders .886, .275,
    #     .839: A and C: 1, 1, 1
    #   budget 3, kappa 2: floors 2, 4, 2 (8 of 9); remainders .269, .695,
    #     .036: B: 2, 5, 2 (8 elements in 5 chunks: torch.chunk gives 4 of 2)
    largest = {
        (2.0, 1.2): {"A": 2, "B": 3, "C": 1},
        (1.0, 1.0): {"A": 1, "B": 1, "C": 1},
        (3.0, 2.0): {"A": 2, "B": 4, "C": 2},
    }
    for (budget, kappa), expected in largest.items():
        allocation = allocate_chunks(
            importance, numel, budget, kappa, "largest_remainder"
        )
        assert allocation.chunks == expected, (budget, kappa)


def test_kappa_zero_gives_one_chunk_each():
    numel = {f"w{i}": 10 + i for i in range(14)}
    importance = {n: random.Random(n).random() for n in numel}
    allocation = allocate_chunks(importance, numel, 1.0, 0.0)
    assert allocation.chunks == dict.fromkeys(numel, 1)


def test_budget_is_never_exceeded_and_counts_match_torch_chunk():
    rng = random.Random(0)
    for _ in range(300):
        count = rng.randint(1, 30)
        numel = {
            f"w{i}": rng.choice([1, 2, 3, 5, 7, 10, 64, 1000]) for i in range(count)
        }
        raw = {n: rng.random() ** 3 for n in numel}
        norm = sum(raw.values())
        importance = {n: v / norm for n, v in raw.items()}
        budget, kappa = (
            rng.choice([0.5, 0.9, 1.0, 1.2, 3.0, 10.0]),
            rng.choice([0.0, 0.5, 1.0, 1.2, 2.0]),
        )
        allocation = allocate_chunks(importance, numel, budget, kappa)
        assert sum(allocation.chunks.values()) <= budget * count + 1e-9
        for name, m in allocation.chunks.items():
            if m:
                assert len(torch.chunk(torch.zeros(numel[name]), m)) == m


def run_pp(tiny, tmp_path, **calibration):
    document = expert_config(tiny, method="expert_merging_pp", calibration=calibration)
    run = run_document(tmp_path, document, out=tmp_path / "out")
    return str(run.out), run.report


def test_pp_end_to_end_chunkwise_task_arithmetic(tiny, tmp_path):
    # reg_weight 0.05: at 0.8 these noise experts keep the start (the optimum).
    out, report = run_pp(tiny, tmp_path, budget=3.0, kappa=1.2, reg_weight=0.05)
    # Training happened in both stages: each kept objective is below its start.
    for stage in ("stage1", "stage2"):
        history = report[stage]
        assert history["objective"][history["kept_epoch"]] < history["objective"][0]
    assert report["outcome"]["moved"]
    chunks = report["allocation"]["chunks"]
    assert sum(chunks.values()) <= 3.0 * len(chunks)
    assert max(chunks.values()) > 1, "the test needs some chunked weights"
    with safe_open(
        os.path.join(out, "expert_merging", "coefficients.safetensors"), "pt"
    ) as handle:
        assert handle.metadata()["method"] == "expert_merging_pp"
        coefficients = {n: handle.get_tensor(n) for n in handle.keys()}
    merged = read_model(out)
    expected = expected_model(tiny.base, [*tiny.experts, tiny.lora], coefficients)
    assert set(merged) == set(expected)
    at_init = set(report["at_init"])  # merged at init, one chunk, not allocated
    assert set(chunks) == set(coefficients) - at_init
    for name, tensor in merged.items():
        if name in at_init:
            assert coefficients[name].shape[1] == 1
        elif name in coefficients:
            assert coefficients[name].shape[1] == max(chunks[name], 1)
        torch.testing.assert_close(
            tensor.double(), expected[name], rtol=1e-5, atol=1e-6
        )
    # Warm start: stage 2 starts at stage 1's coefficients (same alignment loss)
    # and keeps minimizing the same objective, so it never ends above its start.
    stage2 = report["stage2"]
    assert stage2["alignment_loss"][0] == report["loss"]["stage1"]
    # ... and at stage 1's objective value: R weighs each chunk by its share of
    # the tensor and counts the fixed (0-chunk) weights, so splitting is free.
    stage1 = report["stage1"]
    assert stage2["objective"][0] == pytest.approx(
        stage1["objective"][stage1["kept_epoch"]], rel=1e-6
    )
    assert stage2["objective"][stage2["kept_epoch"]] == min(stage2["objective"])
    assert min(stage2["objective"]) <= stage2["objective"][0]
    assert report["loss"]["stage2"] == stage2["alignment_loss"][stage2["kept_epoch"]]
    assert set(report["allocation"]["importance"]) == set(coefficients) - at_init


def test_kappa_zero_stage2_reproduces_stage1(tiny, tmp_path):
    # These two check where stage 2 starts: a fixed reg_weight and a few steps.
    _out, report = run_pp(
        tiny, tmp_path, kappa=0.0, budget=1.0, reg_weight=0.05, max_steps=3
    )
    assert set(report["allocation"]["chunks"].values()) == {1}
    stage1 = report["stage1"]  # stage 1 trained: its start is not the point
    assert stage1["objective"][stage1["kept_epoch"]] < stage1["objective"][0]
    # Same parametrization, same coefficients: the stage-2 starting loss is stage 1's, bit for bit.
    assert report["stage2"]["alignment_loss"][0] == report["loss"]["stage1"]
    assert (
        report["stage1"]["alignment_loss"][report["stage1"]["kept_epoch"]]
        == report["loss"]["stage1"]
    )


def test_stage2_restart_at_init(tiny, tmp_path):
    _out, report = run_pp(
        tiny, tmp_path, stage2_init="init", budget=2.0, reg_weight=0.05, max_steps=3
    )
    stage1 = report["stage1"]  # stage 1 moved, so a warm start would differ
    assert stage1["objective"][stage1["kept_epoch"]] < stage1["objective"][0]
    # Restarted at alpha-bar: stage 2 starts where plain task arithmetic at the init does.
    assert math.isclose(
        report["stage2"]["alignment_loss"][0],
        report["loss"]["task_arithmetic_init"],
        rel_tol=1e-6,
    )
