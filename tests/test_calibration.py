"""The automatic initial alpha against an independent task-arithmetic evaluation."""

import copy
import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_expert.testing.calibration import write_jsonl
from mergekit_expert.testing.cli import run_document
from mergekit_expert.testing.tiny import TINY_CORPUS as CORPUS


@functools.cache
def load(model_dir):
    """A saved model, loaded once per test session (never modified)."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def naive_sample_terms(base_dir, expert_dirs, texts, alpha, layer, excluded="init"):
    """Per expert k: ([KL(expert_k || TA(alpha)) of each sample], [MSE(hidden)
    of each sample]) with plain HF models.

    TA(alpha) merges the projections, and every other tensor too when the
    excluded ones hold task arithmetic at the initial alpha (``excluded: init``).
    """
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = load(base_dir)
    experts = [load(d) for d in expert_dirs]
    merged_state = {}
    base_state = base.state_dict()
    expert_states = [e.state_dict() for e in experts]
    for name, tensor in base_state.items():
        if name.endswith("proj.weight") or excluded == "init":
            merged_state[name] = tensor + alpha * sum(
                e[name] - tensor for e in expert_states
            )
        else:
            merged_state[name] = tensor
    merged = copy.deepcopy(base)
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
            terms.append((kls, mses))
    return terms


def naive_terms(base_dir, expert_dirs, texts, alpha, layer, excluded="init"):
    """Per expert k: (mean_i KL(expert_k || TA(alpha)), mean_i MSE(hidden))."""
    return [
        (sum(kls) / len(kls), sum(mses) / len(mses))
        for kls, mses in naive_sample_terms(
            base_dir, expert_dirs, texts, alpha, layer, excluded
        )
    ]


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


GRID = [0.2, 0.3, 0.37, 0.39, 0.41, 0.43, 0.5, 0.9]


@pytest.mark.parametrize("excluded", ["init", "base"])
def test_auto_init_fits_from_the_lowest_and_its_larger_neighbour(
    tiny, tmp_path, excluded
):
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
            "init_grid": GRID,
            "excluded": excluded,
            # so heavy that no fit moves a coefficient off its start (the L1
            # prox keeps it exactly there): each held-out fit is then task
            # arithmetic at its candidate, which this test can compute itself
            "reg_weight": 1000.0,
        },
    }
    report = run_document(tmp_path, document, out=tmp_path / "out").report
    curve = report["init_curve"]
    assert [point["alpha"] for point in curve] == GRID

    # Each sample's part of the alignment, beta_k * (KL + MSE) / n_k, at each
    # alpha: task arithmetic's curve is their sum.
    per_sample = []
    for alpha in GRID:
        terms = naive_sample_terms(
            tiny.base, tiny.experts, texts, alpha, layer=2, excluded=excluded
        )  # layer 2: the default, the last hidden state (2 blocks)
        per_sample.append(
            [
                [beta * (kl + mse) for kl, mse in zip(kls, mses)]
                for beta, (kls, mses) in zip([1.0, 1.5], terms)
            ]
        )
    totals = [sum(sum(e) / len(e) for e in point) for point in per_sample]
    for point, total in zip(curve, totals):
        assert abs(point["loss"] - total) < 1e-4 * max(1.0, total), (point, total)
    lowest = min(range(len(GRID)), key=totals.__getitem__)

    # The candidates: the lowest and the next larger grid value. Each is fitted
    # on one of two folds (one sample per expert here) and measured on the
    # other, so every sample is held out once, alone in its fold: its held-out
    # share is beta_k * L_i. The lowest is kept unless the larger's held-out
    # alignment is lower by more than the standard error of the paired
    # per-sample difference (sum over experts of n_k times its sample variance).
    selection = report["init_selection"]
    candidates = [GRID[lowest], GRID[lowest + 1]]
    assert selection["candidates"] == pytest.approx(candidates)
    assert selection["reg_weight"] == 1000.0
    held = [sum(map(sum, per_sample[GRID.index(a)])) for a in candidates]
    torch.testing.assert_close(
        selection["held_out_alignment"], held, rtol=1e-4, atol=1e-6
    )
    best = min(range(2), key=held.__getitem__)
    errors = [
        sum(
            len(mine) * torch.tensor(mine).sub(torch.tensor(low)).var().item()
            for mine, low in zip(
                per_sample[GRID.index(a)], per_sample[GRID.index(candidates[best])]
            )
        )
        ** 0.5
        for a in candidates
    ]
    torch.testing.assert_close(
        selection["standard_error"], errors, rtol=1e-4, atol=1e-7
    )
    chosen = candidates[0] if held[0] - held[best] <= errors[0] else candidates[1]
    assert all(abs(v - chosen) < 1e-6 for v in report["init"]), (report["init"], chosen)
    assert selection["alpha"] == pytest.approx(chosen)
    best = chosen
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
    start_loss = totals[GRID.index(best)]
    assert abs(report["loss"]["task_arithmetic_init"] - start_loss) < 1e-4 * start_loss


def one_sample_run(tiny, tmp_path, texts, calibration: dict) -> dict:
    """The report of a one-step expert_merging run on one sample per expert
    (``texts[k]`` for expert k), γ 0.8, with ``calibration`` added; the merge
    is written to ``tmp_path / "out"``."""
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
            "reg_weight": 0.8,
            "max_steps": 1,
            **calibration,
        },
    }
    return run_document(tmp_path, document, out=tmp_path / "out").report


def test_auto_init_with_one_sample_per_expert_starts_at_the_lowest(tiny, tmp_path):
    """Nothing can be held out: task arithmetic's lowest alignment, and a note why."""
    texts = [[CORPUS[0]], [CORPUS[2]]]
    report = one_sample_run(tiny, tmp_path, texts, {"init_grid": GRID})
    totals = [
        sum(kl + mse for kl, mse in naive_terms(tiny.base, tiny.experts, texts, a, 2))
        for a in GRID
    ]
    lowest = GRID[min(range(len(GRID)), key=totals.__getitem__)]
    assert report["init"] == pytest.approx([lowest, lowest])
    selection = report["init_selection"]
    assert selection["candidates"] == [] and selection["held_out_alignment"] == []
    assert "has 1 calibration sample" in selection["note"]
    assert "set calibration.init to a number" in selection["note"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "init: auto: expert " in card


def test_negative_hidden_layer_counts_from_the_last(tiny, tmp_path):
    """hidden_layers: [-2] aligns the hidden state one before the last (index
    1 on the 2-block tiny models, the paper's middle one): the report says
    so, and the start's hidden term is the naive MSE at that index, not at
    the default last one (index 2)."""
    texts = [[CORPUS[0]], [CORPUS[2]]]
    report = one_sample_run(tiny, tmp_path, texts, {"init": 0.5, "hidden_layers": [-2]})
    assert report["hidden_layers"] == [1]
    last = naive_terms(tiny.base, tiny.experts, texts, 0.5, 2)
    middle = naive_terms(tiny.base, tiny.experts, texts, 0.5, 1)
    start = report["alignment_terms"]["start"]
    expected = [mse for _, mse in middle]
    torch.testing.assert_close(start["hidden"], expected, rtol=1e-4, atol=1e-6)
    assert all(abs(a - b) > 1e-3 * b for (_, a), (_, b) in zip(last, middle))
