"""The host merge kernel and chunk layout against hand formulas."""

import pytest
import torch
from mergekit import merge_methods
from mergekit.merge_methods import merge_state_dicts, merge_tensors

import mergekit_expert
from mergekit_expert.coefficients import chunk_count, expand_chunks, reduce_chunks
from mergekit_expert.testing.oracles import hand_merge


def test_the_oracle_on_numbers_worked_by_hand():
    # torch.chunk cuts 5 elements into 2 chunks as 3 + 2, so the coefficients
    # 0.5 and 2 scale tau = expert - base = [1, 2, 3, 4, 5] to [0.5, 1, 1.5, 8, 10].
    base = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    expert = torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0])
    merged = hand_merge(base, [expert], [[0.5, 2.0]])
    assert merged.dtype == torch.float64
    assert merged.tolist() == [1.5, 2.0, 2.5, 9.0, 11.0]
    # Two experts, one coefficient each: tau_1 = 4 everywhere, tau_2 = [[-1, 2],
    # [0, 4]], so 1 + 0.25 * 4 - tau_2 = [[3, 0], [2, -2]].
    other = torch.tensor([[0.0, 3.0], [1.0, 5.0]])
    fives = torch.full((2, 2), 5.0)
    merged = hand_merge(torch.ones(2, 2), [fives, other], [[0.25], [-1.0]])
    assert merged.tolist() == [[3.0, 0.0], [2.0, -2.0]]


@pytest.mark.parametrize(
    "shape,asked",
    [
        ((4, 6), 1),
        ((4, 6), 3),
        ((10,), 4),
        ((10,), 6),
        ((3, 5, 2), 7),
        ((7,), 7),
        ((5,), 8),
    ],
)
def test_kernel_matches_hand_formula(shape, asked):
    generator = torch.Generator().manual_seed(len(shape) * 10 + asked)
    base = torch.randn(shape, generator=generator)
    experts = [torch.randn(shape, generator=generator) for _ in range(3)]
    numel = base.numel()
    m = chunk_count(numel, asked)
    assert m == len(torch.chunk(torch.zeros(numel), asked))
    rows = [torch.rand(m, generator=generator).tolist() for _ in experts]
    snapshot = [t.clone() for t in [base, *experts]]
    weight = [row if m > 1 else row[0] for row in rows]
    result = merge_tensors(
        [base, *experts],
        "expert_merging",
        base_index=0,
        parameters={"weight": {1: weight[0], 2: weight[1], 3: weight[2]}},
    )
    torch.testing.assert_close(result, hand_merge(base, experts, rows).float())
    for before, after in zip(snapshot, [base, *experts]):
        assert torch.equal(before, after), "inputs must not be mutated"


def test_chunk_helpers_follow_torch_chunk():
    for numel in (1, 5, 10, 13, 64):
        for asked in (1, 2, 3, 4, 6, 7, 100):
            pieces = torch.chunk(torch.arange(numel, dtype=torch.float64), asked)
            m = chunk_count(numel, asked)
            assert m == len(pieces)
            values = torch.arange(numel, dtype=torch.float64)
            torch.testing.assert_close(
                reduce_chunks(values, m), torch.stack([p.sum() for p in pieces])
            )
            coefficients = torch.arange(m, dtype=torch.float64) + 1
            expected = torch.cat(
                [torch.full_like(p, c) for p, c in zip(pieces, coefficients)]
            )
            torch.testing.assert_close(expand_chunks(coefficients, numel), expected)


def test_non_contiguous_inputs_and_bfloat16():
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(6, 4, generator=generator).t()  # strided view
    expert = torch.randn(4, 12, generator=generator)[:, ::2]
    assert not base.is_contiguous() and not expert.is_contiguous()
    result = merge_tensors(
        [base, expert],
        "expert_merging_pp",
        base_index=0,
        parameters={"weight": [[0.2, 0.7]]},
    )
    expected = hand_merge(
        base.contiguous(), [expert.contiguous()], [[0.2, 0.7]]
    ).float()
    torch.testing.assert_close(result, expected)
    low = merge_tensors(
        [base.bfloat16(), expert.bfloat16()],
        "expert_merging",
        base_index=0,
        parameters={"weight": 0.5},
    )
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(
        low.float(),
        hand_merge(
            base.bfloat16().float(), [expert.bfloat16().float()], [[0.5]]
        ).float(),
        atol=1e-2,
        rtol=1e-2,
    )


def test_merge_state_dicts_with_explicit_weights():
    generator = torch.Generator().manual_seed(5)
    states = [
        {
            "a": torch.randn(3, 4, generator=generator),
            "b": torch.randn(5, generator=generator),
        }
        for _ in range(3)
    ]
    merged = merge_state_dicts(
        {"base": states[0], "x": states[1], "y": states[2]},
        "expert_merging",
        base="base",
        parameters={"weight": {"x": 0.25, "y": 0.5}},
    )
    for name in ("a", "b"):
        expected = (
            states[0][name]
            + 0.25 * (states[1][name] - states[0][name])
            + 0.5 * (states[2][name] - states[0][name])
        )
        torch.testing.assert_close(merged[name], expected)


def test_errors_without_coefficients_or_base():
    base, expert = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="needs learned coefficients"):
        merge_tensors([base, expert], "expert_merging", base_index=0)
    with pytest.raises(ValueError, match="requires a base"):
        merge_tensors([base, expert], "expert_merging", parameters={"weight": 0.3})
    with pytest.raises(ValueError, match="torch.chunk"):
        # 10 elements cannot have 6 chunk coefficients: torch.chunk gives 5.
        merge_tensors(
            [torch.zeros(10), torch.ones(10)],
            "expert_merging",
            base_index=0,
            parameters={"weight": [[0.1] * 6]},
        )
    with pytest.raises(ValueError, match="some inputs"):
        merge_tensors(
            [base, expert, expert * 2],
            "expert_merging",
            base_index=0,
            parameters={"weight": {1: 0.3, 2: None}},
        )


def test_registration_is_idempotent():
    mergekit_expert.register()
    mergekit_expert.register()
    names = [m.spec.name for m in merge_methods.registered_methods()]
    assert names.count("expert_merging") == 1 and names.count("expert_merging_pp") == 1
    assert merge_methods.get("expert_merging").spec.contract.base.value == "required"
