"""The two host merge methods: chunk-wise task arithmetic with given coefficients.

``merged = base + sum_k sum_s alpha[k, s] * (expert_k - base)[chunk s]``

Coefficients come either explicitly (per-input ``weight``: a number, or a list of
chunk coefficients) or from a coefficients artifact (shared ``coefficients``: its
path), in which a weight the artifact does not list is copied from the base.
Without either the kernel raises: there is no silent fixed-coefficient fallback.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Hashable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from mergekit import merge_methods
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    PerInputValues,
    TensorGroup,
)

from .coefficients import CoefficientArtifact, chunk_count, expand_chunks

Coefficient = float | list[float] | None


@functools.lru_cache(maxsize=4)
def _load_artifact(path: str, mtime_ns: int) -> CoefficientArtifact:
    return CoefficientArtifact.load(path)


def load_artifact_cached(path: str) -> CoefficientArtifact:
    """Load once per file version: the kernel asks for it for every tensor."""
    if not os.path.isfile(path):
        return CoefficientArtifact.load(path)  # raises the explanatory error
    return _load_artifact(os.path.abspath(path), os.stat(path).st_mtime_ns)


@dataclass(frozen=True)
class ExpertMergingMethod(GroupMergeMethod):
    name: str
    pretty_name: str

    @cached_property
    def spec(self) -> MergeMethodSpec:
        return MergeMethodSpec(
            name=self.name,
            pretty_name=self.pretty_name,
            reference_url="https://arxiv.org/abs/2509.25712",
            parameters=(
                ParameterSpec(
                    "weight",
                    Coefficient,
                    ParameterScope.NON_BASE,
                    default=None,
                    description="alpha of this expert: a number, or chunk coefficients",
                ),
                ParameterSpec(
                    "coefficients",
                    str | None,
                    ParameterScope.SHARED,
                    default=None,
                    description="path of a coefficients.safetensors artifact",
                ),
            ),
            contract=InputContract(base=BasePolicy.REQUIRED),
        )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        experts = group.non_base
        if not base.is_floating_point():
            raise TypeError(f"{self.name} requires floating-point tensors")
        rows = self._coefficients(
            group, parameters["weight"], parameters["coefficients"]
        )
        if rows is None:
            return base.clone()
        compute = torch.float64 if base.dtype == torch.float64 else torch.float32
        base_flat = base.reshape(-1).to(compute)
        result = base_flat.clone()
        numel = base_flat.numel()
        for entry, row in zip(experts, rows):
            row = row.to(device=base.device, dtype=compute)
            delta = entry.tensor.reshape(-1).to(compute) - base_flat
            if row.numel() == 1:
                result.add_(delta, alpha=float(row))
            else:
                result.addcmul_(delta, expand_chunks(row, numel))
            del delta
        return result.reshape(base.shape).to(base.dtype)

    def _coefficients(
        self,
        group: TensorGroup,
        weight: PerInputValues[Coefficient],
        coefficients_path: str | None,
    ) -> list[torch.Tensor] | None:
        """One coefficient row per non-base input, or None to copy the base."""
        experts = group.non_base
        name = group.metadata.name or "<unnamed tensor>"
        explicit = [weight.get(entry.id) if weight else None for entry in experts]
        numel = group.base.tensor.numel()
        if all(value is not None for value in explicit):
            rows = [
                torch.tensor(value, dtype=torch.float32).reshape(-1)
                for value in explicit
            ]
            for entry, row in zip(experts, rows):
                if row.numel() == 0 or row.numel() != chunk_count(numel, row.numel()):
                    raise ValueError(
                        f"{self.name}: {row.numel()} chunk coefficients for input "
                        f"{entry.id} of {name} ({numel} elements) do not match the "
                        f"torch.chunk layout (it gives {chunk_count(numel, max(row.numel(), 1))} chunks)"
                    )
            return rows
        if any(value is not None for value in explicit):
            missing = [str(e.id) for e, v in zip(experts, explicit) if v is None]
            raise ValueError(
                f"{self.name}: weight given for some inputs of {name} but not for {missing}; "
                "give every expert a weight, or none and use a coefficients artifact"
            )
        if coefficients_path is None:
            raise ValueError(
                f"{self.name} needs learned coefficients for {name}: run "
                "`mergekit-expert CONFIG OUT` to calibrate them, pass "
                "`parameters: {coefficients: PATH}` pointing at a coefficients "
                "artifact, or give each expert an explicit `weight`"
            )
        artifact = load_artifact_cached(coefficients_path)
        matrix = artifact.coefficients.get(group.metadata.name)
        if matrix is None:
            return None
        return [matrix[index] for index in _expert_rows(artifact, experts, name)]


def _expert_rows(artifact: CoefficientArtifact, experts, name: str) -> list[int]:
    """Rows of the artifact for these inputs, matched by model reference."""
    order = {ref: index for index, ref in enumerate(artifact.experts)}
    ids: list[Hashable] = [entry.id for entry in experts]
    rows = [order.get(str(entry_id)) for entry_id in ids]
    found = [row for row in rows if row is not None]
    if len(ids) != len(artifact.experts) or len(found) != len(rows):
        raise ValueError(
            f"coefficients artifact was calibrated for experts {list(artifact.experts)} "
            f"but {name} is merged from {[str(i) for i in ids]}; use the same model "
            "references as the calibrated config"
        )
    return found


EXPERT_MERGING = ExpertMergingMethod("expert_merging", "Expert Merging")
EXPERT_MERGING_PP = ExpertMergingMethod("expert_merging_pp", "Expert Merging++")


def register() -> None:
    """Register both methods with mergekit; calling it again does nothing."""
    from . import compat

    known = {method.spec.name for method in merge_methods.registered_methods()}
    for method in (EXPERT_MERGING, EXPERT_MERGING_PP):
        if method.spec.name not in known:
            merge_methods.register(method)
    compat.apply()
