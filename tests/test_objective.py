"""Each loss term against a hand computation on small tensors."""

import math

import torch

from mergekit_expert.objective import hidden_loss, logit_loss, regularizer


def softmax(row, t):
    exps = [math.exp(v / t) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def test_logit_loss_is_scaled_kl_over_positions():
    teacher = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    student = [[0.5, 0.5, 0.5], [1.0, 0.0, 2.0]]
    for t in (1.0, 2.0):
        kls = []
        for p_row, q_row in zip(teacher, student):
            p, q = softmax(p_row, t), softmax(q_row, t)
            kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
        expected = t * t * sum(kls) / 2
        got = logit_loss(torch.tensor(student), torch.tensor(teacher), temperature=t)
        assert math.isclose(float(got), expected, rel_tol=1e-5)
        masked = logit_loss(
            torch.tensor(student), torch.tensor(teacher), t, torch.tensor([False, True])
        )
        assert math.isclose(float(masked), t * t * kls[1], rel_tol=1e-5)
    same = logit_loss(torch.tensor(teacher), torch.tensor(teacher))
    assert abs(float(same)) < 1e-6


def test_hidden_loss_is_element_mean_squared_error_averaged_over_layers():
    a = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])]
    b = [torch.tensor([[1.0, 0.0], [3.0, 1.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]])]
    layer0 = (0 + 4 + 0 + 9) / 4
    layer1 = (4 + 0 + 0 + 0) / 4
    assert math.isclose(float(hidden_loss(a, b)), (layer0 + layer1) / 2)
    only_first_position = ((0 + 4) / 2 + (4 + 0) / 2) / 2
    assert math.isclose(
        float(hidden_loss(a, b, torch.tensor([True, False]))), only_first_position
    )


def test_regularizer_is_the_paper_r_for_one_coefficient_per_weight():
    alphas = {"w1": torch.tensor([[0.5], [0.1]]), "w2": torch.tensor([[0.3], [0.6]])}
    init = [0.3, 0.2]
    # expert 0: |0.5-0.3| + |0.3-0.3| = 0.2; expert 1: |0.1-0.2| + |0.6-0.2| = 0.5
    # R = (0.2 + 0.5) / (2 weights per expert)
    assert math.isclose(float(regularizer(alphas, init)), 0.7 / 2, rel_tol=1e-6)


def test_regularizer_weighs_chunks_by_their_share_of_the_tensor():
    alphas = {
        "w1": torch.tensor([[0.5], [0.1]]),
        "w2": torch.tensor([[0.3, 0.2, 0.4], [0.0, 0.2, 0.6]]),  # 7 elements: 3, 3, 1
    }
    shares = {"w1": torch.tensor([1.0]), "w2": torch.tensor([3 / 7, 3 / 7, 1 / 7])}
    fixed = {"w3": torch.tensor([[0.9], [0.2]])}  # untrained: a constant term
    init = [0.3, 0.2]
    # expert 0: 0.2 + (3*0 + 3*0.1 + 1*0.1)/7 + |0.9-0.3| = 0.2 + 0.4/7 + 0.6
    # expert 1: 0.1 + (3*0.2 + 3*0 + 1*0.4)/7 + 0 = 0.1 + 1.0/7
    expected = (0.2 + 0.4 / 7 + 0.6 + 0.1 + 1.0 / 7) / 3  # 3 weights
    got = regularizer(alphas, init, shares, fixed)
    assert math.isclose(float(got), expected, rel_tol=1e-6)
    # Splitting a weight into chunks of equal alphas leaves R as it was.
    split = {"w1": torch.tensor([[0.5, 0.5], [0.1, 0.1]]), "w2": alphas["w2"]}
    shares["w1"] = torch.tensor([0.5, 0.5])
    again = regularizer(split, init, shares, fixed)
    assert math.isclose(float(again), expected, rel_tol=1e-6)
