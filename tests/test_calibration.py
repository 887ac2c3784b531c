"""The automatic initial alpha against an independent task-arithmetic evaluation."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_expert.testing.calibration import write_jsonl
from mergekit_expert.testing.cli import run_document
from mergekit_expert.testing.tiny import TINY_CORPUS as CORPUS


def naive_terms(base_dir, expert_dirs, texts, alpha, layer, excluded="init"):
    """Per expert k: (mean_i KL(expert_k || TA(alpha)), mean_i MSE(hidden)) with
    plain HF models.

    TA(alpha) merges the projections, and every other tensor too when the
    excluded ones hold task arithmetic at the initial alpha (``excluded: init``).
    """
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    experts = [
        AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        for d in expert_dirs
    ]
    merged_state = {}
    base_state = base.state_dict()
    for name, tensor in base_state.items():
        if name.endswith("proj.weight") or excluded == "init":
            merged_state[name] = tensor + alpha * sum(
                e.state_dict()[name] - tensor for e in experts
            )
        else:
            merged_state[name] = tensor
    merged = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    merged.load_state_dict(merged_state)
    terms = []
    with torch.no_grad():
        for expert, expert_texts in zip(experts, texts):
            kls, mses = [], []
            for text in expert_texts:
                ids = torch.tensor([tokenizer(text)["input_ids"]])
                teacher = expert(ids, output_hidden_states=True)
                student = merged(ids, output_hidden_states=True)
                p = torch.softmax(teacher.logits[0], -1)
                kl = (
                    (p * (p.log() - torch.log_softmax(student.logits[0], -1)))
                    .sum(-1)
                    .mean()
                )
                mse = (
                    (teacher.hidden_states[layer][0] - student.hidden_states[layer][0])
                    .pow(2)
                    .mean()
                )
                kls.append(float(kl))
                mses.append(float(mse))
            terms.append((sum(kls) / len(kls), sum(mses) / len(mses)))
    return terms


def naive_alignment(
    base_dir, expert_dirs, texts, task_weights, alpha, layer, excluded="init"
):
    """sum_k beta_k mean_i [KL(expert_k || TA(alpha)) + MSE(hidden)]."""
    terms = naive_terms(base_dir, expert_dirs, texts, alpha, layer, excluded)
    return sum(beta * (kl + mse) for beta, (kl, mse) in zip(task_weights, terms))


def calibration_files(folder, texts):
    """One JSONL calibration file per expert, a ``text`` record per string."""
    return [
        write_jsonl(str(folder / f"{k}.jsonl"), [{"text": t} for t in group])
        for k, group in enumerate(texts)
    ]


@pytest.mark.parametrize("excluded", ["init", "base"])
def test_auto_init_picks_the_best_task_arithmetic_alpha(tiny, tmp_path, excluded):
    texts = [[CORPUS[0], CORPUS[3]], [CORPUS[2], CORPUS[1]]]
    files = calibration_files(tmp_path, texts)
    document = {
        "merge_method": "expert_merging",
        "base_model": tiny.base,
        "models": [
            {"model": tiny.experts[0], "parameters": {"calibration": files[0]}},
            {
                "model": tiny.experts[1],
                "parameters": {"calibration": files[1], "task_weight": 1.5},
            },
        ],
        "calibration": {
            "samples_per_expert": 2,
            "epochs": 1,
            "init_grid": [0.2, 0.5, 0.9],
            "excluded": excluded,
        },
    }
    report = run_document(tmp_path, document, out=tmp_path / "out").report
    curve = report["init_curve"]
    assert [point["alpha"] for point in curve] == [0.2, 0.5, 0.9]
    for point in curve:
        expected = naive_alignment(
            tiny.base,
            tiny.experts,
            texts,
            [1.0, 1.5],
            point["alpha"],
            layer=2,  # the default: the last hidden state (2 blocks)
            excluded=excluded,
        )
        assert abs(point["loss"] - expected) < 1e-4 * max(1.0, expected), (
            point,
            expected,
        )
    best = min(curve, key=lambda p: p["loss"])["alpha"]
    assert all(abs(v - best) < 1e-6 for v in report["init"])
    # the report splits each expert's alignment at the start into its terms
    kl, mse = zip(*naive_terms(tiny.base, tiny.experts, texts, best, 2, excluded))
    start = report["alignment_terms"]["start"]
    torch.testing.assert_close(start["logit"], list(kl), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(start["hidden"], list(mse), rtol=1e-4, atol=1e-6)
    final = report["alignment_terms"]["final"]
    torch.testing.assert_close(
        [a + b for a, b in zip(final["logit"], final["hidden"])],
        report["expert_loss_final"],
        rtol=1e-5,
        atol=1e-7,
    )
    # and, weighted by beta, they add up to the training loop's own measure
    # of the kept coefficients' alignment
    weighted = sum(
        beta * (a + b)
        for beta, a, b in zip([1.0, 1.5], final["logit"], final["hidden"])
    )
    assert abs(weighted - report["loss"]["stage1"]) < 1e-5 * max(1.0, weighted)
    assert (
        abs(report["loss"]["task_arithmetic_init"] - min(p["loss"] for p in curve))
        < 1e-5
    )


def test_negative_hidden_layer_counts_from_the_last(tiny, tmp_path):
    """hidden_layers: [-2] aligns the hidden state one before the last (index
    1 on the 2-block tiny models, the paper's middle one): the report says
    so, and the start's hidden term is the naive MSE at that index, not at
    the default last one (index 2)."""
    texts = [[CORPUS[0]], [CORPUS[2]]]
    files = calibration_files(tmp_path, texts)
    models = [
        {"model": m, "parameters": {"calibration": f}}
        for m, f in zip(tiny.experts, files)
    ]
    document = {
        "merge_method": "expert_merging",
        "base_model": tiny.base,
        "models": models,
        "calibration": {
            "samples_per_expert": 1,
            "init": 0.5,
            "reg_weight": 0.8,
            "max_steps": 1,
            "hidden_layers": [-2],
        },
    }
    report = run_document(tmp_path, document, out=tmp_path / "out").report
    assert report["hidden_layers"] == [1]
    last = naive_terms(tiny.base, tiny.experts, texts, 0.5, 2)
    middle = naive_terms(tiny.base, tiny.experts, texts, 0.5, 1)
    start = report["alignment_terms"]["start"]
    expected = [mse for _, mse in middle]
    torch.testing.assert_close(start["hidden"], expected, rtol=1e-4, atol=1e-6)
    assert all(abs(a - b) > 1e-3 * b for (_, a), (_, b) in zip(last, middle))
