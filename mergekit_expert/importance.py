"""Expert Merging++: layer importance and the chunk budget (the paper, stage 2).

s_k(l)  = mean|tau_k(l)|, normalized over layers per expert
I(l)    = Norm_l( sum_k |alpha_k(l)| * s_k(l) * n(l) )        (l1 over layers)
q(l)    = B * I(l)^kappa / sum_j I(j)^kappa,  B = budget * L
m(l)    = floor(q(l))  (the paper), or largest remainder: floor(q(l)) plus one
          for the round(B) - sum floor(q) weights with the largest q - floor(q)

m(l) is then the count ``torch.chunk`` really returns for m(l) chunks (never
more than asked, so sum m <= B still holds); m(l) = 0 means one fixed,
untrainable coefficient per expert.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .coefficients import chunk_count

# floor() of a value that should be an integer but lies a rounding error below it
# (e.g. 14 * (1/14)) must not lose a chunk.
ROUNDING = 1e-9


@dataclass(frozen=True)
class Allocation:
    importance: dict[str, float]
    chunks: dict[str, int]  # 0 = fixed coefficient
    budget: float  # B

    @property
    def trainable(self) -> dict[str, int]:
        return {n: m for n, m in self.chunks.items() if m > 0}


def layer_importance(
    alphas: Mapping[str, torch.Tensor],
    mean_abs: Mapping[str, torch.Tensor],
    numels: Mapping[str, int],
) -> dict[str, float]:
    """I(l) from stage-1 alphas [K, 1], mean|tau| [K] and element counts."""
    names = list(alphas)
    totals = torch.stack([mean_abs[n] for n in names]).sum(0)  # [K], per expert
    totals = torch.where(totals > 0, totals, torch.ones_like(totals))
    raw = {}
    for name in names:
        s = mean_abs[name] / totals
        a = alphas[name].detach().double().cpu().abs().mean(dim=1)  # [K]
        raw[name] = float((a * s).sum() * numels[name])
    norm = sum(raw.values())
    if norm <= 0:
        return {n: 1.0 / len(names) for n in names}
    return {n: v / norm for n, v in raw.items()}


def allocate_chunks(
    importance: Mapping[str, float],
    numels: Mapping[str, int],
    budget_ratio: float,
    kappa: float,
    rule: str = "floor",
) -> Allocation:
    """m(l) from the quotas q(l) = B * I^kappa / sum I^kappa, then clipped to what
    torch.chunk returns.

    ``floor`` (the paper): m = floor(q); with even importance this spends far
    less than B (q just below 1 everywhere gives 0 chunks everywhere).
    ``largest_remainder``: m = floor(q), then one more chunk for the round(B) -
    sum floor(q) weights with the largest remainders q - floor(q) (ties: the
    more important weight first), so exactly round(B) chunks are asked for.
    """
    names = list(importance)
    budget = budget_ratio * len(names)
    powered = {n: (importance[n] ** kappa if importance[n] > 0 else 0.0) for n in names}
    if kappa == 0:
        powered = dict.fromkeys(names, 1.0)
    total = sum(powered.values())
    quota = {n: budget * powered[n] / total if total > 0 else 0.0 for n in names}
    asked = {n: math.floor(quota[n] + ROUNDING) for n in names}
    if rule == "largest_remainder":
        budget = float(round(budget))
        spare = int(budget) - sum(asked.values())
        by_remainder = sorted(
            names, key=lambda n: (asked[n] - quota[n], -powered[n], names.index(n))
        )
        for name in by_remainder[: max(spare, 0)]:
            asked[name] += 1
    chunks = {}
    for name in names:
        chunks[name] = chunk_count(numels[name], asked[name]) if asked[name] > 0 else 0
    # The rounding allowance may only ever restore exact integers; never exceed B.
    while sum(chunks.values()) > math.floor(budget + ROUNDING):
        largest = max(chunks, key=lambda n: chunks[n])
        chunks[largest] = (
            chunk_count(numels[largest], chunks[largest] - 1)
            if chunks[largest] > 1
            else 0
        )
    return Allocation(importance=dict(importance), chunks=chunks, budget=budget)
