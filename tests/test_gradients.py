"""Coefficient gradients by projection equal autograd through a naive functional merge."""

import pytest
import torch
from torch.func import functional_call
from transformers import LlamaForCausalLM

from mergekit_expert.coefficients import chunk_count
from mergekit_expert.config import DEFAULT_EXCLUDE
from mergekit_expert.objective import hidden_loss, logit_loss, regularizer
from mergekit_expert.student import Student, select_weights
from mergekit_expert.testing.models import tiny_config


def naive_loss(model, base, task_vectors, raw, activation, init, ids, teacher, layer):
    """Every task vector in the graph: theta = base + sum_k alpha_k (chunk-wise) tau_k."""
    params = {}
    for name, tau in task_vectors.items():
        alpha = activation(raw[name])
        k, numel = tau.shape
        m = alpha.shape[1]
        pieces = torch.chunk(torch.zeros(numel), m)
        per_element = torch.stack(
            [
                torch.cat([alpha[j, s].expand(len(p)) for s, p in enumerate(pieces)])
                for j in range(k)
            ]
        )
        params[name] = (base[name] + (per_element * tau).sum(0)).reshape(
            dict(model.named_parameters())[name].shape
        )
    out = functional_call(
        model, params, (ids[None],), {"output_hidden_states": True, "use_cache": False}
    )
    loss = logit_loss(out.logits[0], teacher[0]) + hidden_loss(
        [out.hidden_states[layer][0]], [teacher[1]]
    )
    return loss + 0.8 * regularizer({n: activation(w) for n, w in raw.items()}, init)


@pytest.mark.parametrize(
    "chunks,activation", [(1, "sigmoid"), (3, "sigmoid"), (5, "identity")]
)
def test_projection_equals_autograd(chunks, activation):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(64, layers=2, hidden=16)).eval()
    names = select_weights([n for n, _ in model.named_parameters()], DEFAULT_EXCLUDE)
    assert names and all("proj" in n for n in names)
    params = dict(model.named_parameters())
    base = {n: params[n].detach().reshape(-1).clone() for n in names}
    task_vectors = {n: torch.randn(2, base[n].numel()) * 0.1 for n in names}
    ids = torch.randint(0, 64, (12,))
    teacher = (torch.randn(12, 64), torch.randn(12, 16))
    layer = 1

    student = Student(
        model,
        task_vectors,
        [0.3, 0.6],
        activation=activation,
        chunks={n: chunks for n in names},
    )
    # Move off the init so the regularizer has a non-zero subgradient everywhere.
    with torch.no_grad():
        for w in student.parameters():
            w.add_(torch.randn_like(w) * 0.2)
    student.load()
    logits, hidden = student.forward(ids, [layer])
    loss = logit_loss(logits, teacher[0]) + hidden_loss(hidden, [teacher[1]])
    loss.backward()
    grads = student.projected_grads()
    alphas = student.alphas()
    surrogate = 0.8 * regularizer(alphas, student.init) + sum(
        (alphas[n] * grads[n]).sum() for n in alphas
    )
    surrogate.backward()
    ours = {n: w.grad.clone() for n, w in student.raw.items()}

    raw = {n: w.detach().clone().requires_grad_(True) for n, w in student.raw.items()}
    for n in names:
        assert raw[n].shape == (2, chunk_count(base[n].numel(), chunks))
    reference = naive_loss(
        model,
        base,
        task_vectors,
        raw,
        student.activation,
        student.init,
        ids,
        teacher,
        layer,
    )
    reference.backward()
    for n in names:
        torch.testing.assert_close(ours[n], raw[n].grad, rtol=1e-4, atol=1e-7)


def test_reset_settles_the_initial_alpha():
    """An init whose first float32 round trip through the sigmoid is not yet a
    fixed point: the regularizer's target is one, so the raw coefficients give
    it back exactly and resetting from it (as stage 2 or a resume does) keeps it."""
    import math
    import random

    def trip(a: float) -> float:  # float32 sigmoid of the float64 logit
        return float(torch.sigmoid(torch.tensor(math.log(a / (1 - a)))))

    rng = random.Random(0)
    drifting = [
        a for a in (rng.random() for _ in range(5000)) if trip(trip(a)) != trip(a)
    ]
    assert len(drifting) >= 2, "the test needs values that drift on a second trip"
    model = LlamaForCausalLM(tiny_config(64, layers=1, hidden=16)).eval()
    names = select_weights([n for n, _ in model.named_parameters()], DEFAULT_EXCLUDE)
    params = dict(model.named_parameters())
    task_vectors = {n: torch.randn(2, params[n].numel()) for n in names}
    student = Student(model, task_vectors, drifting[:2])
    first = list(student.init)
    assert first != [trip(a) for a in drifting[:2]]  # more than one trip was taken
    assert all(trip(a) == a for a in first)
    for alphas in student.alphas().values():
        assert torch.equal(alphas, torch.tensor(first)[:, None].expand_as(alphas))
    student.reset(student.init)
    assert student.init == first
