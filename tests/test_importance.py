"""Expert Merging++: importance, chunk allocation and stage 2, against hand derivations."""

import json
import math
import os
import random

import torch
import yaml
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import expert_config
from mergekit_expert.cli import main
from mergekit_expert.importance import allocate_chunks, layer_importance
from mergekit_expert.task_vectors import ResidentTaskVectors


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

    # s_k(l) = mean|tau_k(l)| / sum_l mean|tau_k(l)|: expert 0 sums to 1.75, expert 1 to 1.0.
    s = {
        "A": (1.0 / 1.75, 0.2 / 1.0),
        "B": (0.5 / 1.75, 0.2 / 1.0),
        "C": (0.25 / 1.75, 0.6 / 1.0),
    }
    raw = {n: (alpha[n][0] * s[n][0] + alpha[n][1] * s[n][1]) * numel[n] for n in numel}
    # raw A = (0.5/1.75 + 0.04) * 4, B = (0.4*0.5/1.75 + 0.12) * 8, C = (0.3*0.25/1.75 + 0.06) * 12
    assert math.isclose(raw["A"], (0.5 / 1.75 + 0.04) * 4)
    total = raw["A"] + raw["B"] + raw["C"]
    expected_importance = {n: raw[n] / total for n in numel}

    vectors = ResidentTaskVectors(
        {n: torch.zeros(numel[n]) for n in numel}, task_vectors
    )
    importance = layer_importance(alphas, vectors.mean_abs(), numel)
    for n in numel:
        assert math.isclose(importance[n], expected_importance[n], rel_tol=1e-6)

    for budget, kappa in ((2.0, 1.2), (1.0, 1.0), (3.0, 2.0), (1.0, 0.0)):
        big_b = budget * 3
        weights = {n: expected_importance[n] ** kappa for n in numel}
        norm = sum(weights.values())
        expected = {n: math.floor(big_b * weights[n] / norm + 1e-9) for n in numel}
        expected = {
            n: len(torch.chunk(torch.zeros(numel[n]), m)) if m else 0
            for n, m in expected.items()
        }
        allocation = allocate_chunks(importance, numel, budget, kappa)
        assert allocation.chunks == expected, (budget, kappa)
        assert allocation.budget == big_b
    # The numbers themselves, for the default kappa with budget 2: B = 6.
    i = expected_importance
    assert allocate_chunks(importance, numel, 2.0, 1.2).chunks == {
        n: math.floor(6 * i[n] ** 1.2 / sum(v**1.2 for v in i.values())) for n in numel
    }


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
    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump(document))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, [str(config), str(out), "--quiet"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    report = json.load(open(out / "expert_merging" / "report.json"))
    return str(out), report


def model_tensors(directory):
    return load_file(os.path.join(directory, "model.safetensors"))


def test_pp_end_to_end_chunkwise_task_arithmetic(tiny, tmp_path):
    out, report = run_pp(tiny, tmp_path, budget=3.0, kappa=1.2)
    chunks = report["allocation"]["chunks"]
    assert sum(chunks.values()) <= 3.0 * len(chunks)
    assert max(chunks.values()) > 1, "the test needs some chunked weights"
    with safe_open(
        os.path.join(out, "expert_merging", "coefficients.safetensors"), "pt"
    ) as handle:
        assert handle.metadata()["method"] == "expert_merging_pp"
        coefficients = {n: handle.get_tensor(n) for n in handle.keys()}
    base = model_tensors(tiny.base)
    experts = [model_tensors(tiny.experts[0]), model_tensors(tiny.experts[1])]
    config = json.load(
        open(os.path.join(tiny.lora.split("+")[1], "adapter_config.json"))
    )
    adapter = load_file(
        os.path.join(tiny.lora.split("+")[1], "adapter_model.safetensors")
    )
    lora = dict(base)
    for key, a in adapter.items():
        if ".lora_A." in key:
            name = key.replace("base_model.model.", "").replace(".lora_A", "")
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            lora[name] = base[name] + config["lora_alpha"] / config["r"] * (b @ a)
    experts.append(lora)
    merged = model_tensors(out)
    for name, tensor in merged.items():
        flat = base[name].double().reshape(-1).clone()
        if name in coefficients:
            matrix = coefficients[name]
            assert matrix.shape[1] == max(chunks[name], 1)
            for k, expert in enumerate(experts):
                tau = expert[name].double().reshape(-1) - base[name].double().reshape(
                    -1
                )
                offset = 0
                for s, piece in enumerate(torch.chunk(tau, matrix.shape[1])):
                    flat[offset : offset + len(piece)] += float(matrix[k, s]) * piece
                    offset += len(piece)
        torch.testing.assert_close(
            tensor.double(), flat.reshape(tensor.shape), rtol=1e-5, atol=1e-6
        )
    # Warm start: stage 2 starts at stage 1's coefficients (same alignment loss)
    # and keeps minimizing the same objective, so it never ends above its start.
    stage2 = report["stage2"]
    assert stage2["alignment_loss"][0] == report["loss"]["stage1"]
    assert stage2["objective"][stage2["kept_epoch"]] == min(stage2["objective"])
    assert min(stage2["objective"]) <= stage2["objective"][0]
    assert report["loss"]["stage2"] == stage2["alignment_loss"][stage2["kept_epoch"]]
    assert set(report["allocation"]["importance"]) == set(coefficients)


def test_kappa_zero_stage2_reproduces_stage1(tiny, tmp_path):
    _out, report = run_pp(tiny, tmp_path, kappa=0.0, budget=1.0, epochs=1)
    assert set(report["allocation"]["chunks"].values()) == {1}
    # Same parametrization, same coefficients: the stage-2 starting loss is stage 1's, bit for bit.
    assert report["stage2"]["alignment_loss"][0] == report["loss"]["stage1"]
    assert (
        report["stage1"]["alignment_loss"][report["stage1"]["kept_epoch"]]
        == report["loss"]["stage1"]
    )


def test_stage2_restart_at_init(tiny, tmp_path):
    _out, report = run_pp(tiny, tmp_path, stage2_init="init", budget=2.0, epochs=1)
    # Restarted at alpha-bar: stage 2 starts where plain task arithmetic at the init does.
    assert math.isclose(
        report["stage2"]["alignment_loss"][0],
        report["loss"]["task_arithmetic_init"],
        rel_tol=1e-6,
    )
