"""The coefficients artifact and the chunk layout shared by training and merging.

A calibrated weight has a [K, m] coefficient matrix: one row per expert (YAML
order), one column per chunk of the row-major flattened tensor, laid out exactly
as ``torch.chunk(flat, m)`` lays it out. Both the calibration stage and the host
merge kernel go through :func:`chunk_size` / :func:`expand_chunks` /
:func:`reduce_chunks`, so they cannot disagree.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "mergekit-expert/1"
ARTIFACT_DIR = "expert_merging"
ARTIFACT_NAME = "coefficients.safetensors"
METHOD_NAMES = ("expert_merging", "expert_merging_pp")


def chunk_size(numel: int, chunks: int) -> int:
    """Elements per chunk of ``torch.chunk(flat, chunks)`` (the last may be shorter)."""
    if chunks < 1:
        raise ValueError(f"chunk count must be >= 1, got {chunks}")
    return max(1, math.ceil(numel / chunks))


def chunk_count(numel: int, chunks: int) -> int:
    """How many chunks ``torch.chunk`` really returns when asked for ``chunks``.

    It can be fewer than asked (10 elements in 6 chunks gives five chunks of 2);
    every coefficient must map to a real chunk, so callers size rows with this.
    """
    if numel == 0:
        return 1
    return math.ceil(numel / chunk_size(numel, chunks))


def chunk_shares(numel: int, chunks: int) -> torch.Tensor:
    """Each chunk's fraction of the tensor's elements, [chunks] float32 (sums to 1)."""
    size = chunk_size(numel, chunks)
    sizes = [min(size, numel - s * size) for s in range(chunk_count(numel, chunks))]
    return torch.tensor(sizes, dtype=torch.float64).div(numel).float()


def expand_chunks(coefficients: torch.Tensor, numel: int) -> torch.Tensor:
    """Per-element coefficients [..., numel] from per-chunk ones [..., m]."""
    m = coefficients.shape[-1]
    if m == 1:
        return coefficients.expand(*coefficients.shape[:-1], numel)
    size = chunk_size(numel, m)
    if chunk_count(numel, m) != m:
        raise ValueError(
            f"{m} chunk coefficients do not fit a tensor of {numel} elements: "
            f"torch.chunk gives {chunk_count(numel, m)} chunks"
        )
    return coefficients.repeat_interleave(size, dim=-1)[..., :numel]


def reduce_chunks(values: torch.Tensor, chunks: int) -> torch.Tensor:
    """Sum per-element values [..., numel] over each chunk, giving [..., chunks]."""
    numel = values.shape[-1]
    size = chunk_size(numel, chunks)
    padded = torch.nn.functional.pad(values, (0, size * chunks - numel))
    return padded.reshape(*values.shape[:-1], chunks, size).sum(-1)


@dataclass(frozen=True)
class CoefficientArtifact:
    """Learned coefficients of one merge, as stored in ``coefficients.safetensors``."""

    coefficients: Mapping[str, torch.Tensor]  # name -> float32 [K, m]
    method: str
    base: str
    experts: Sequence[str]
    init: Sequence[float]
    # Weights merged at the initial alphas and never calibrated (``excluded:
    # init``): written like the others, left out of summaries and the heatmap.
    at_init: Sequence[str] = ()

    def __post_init__(self):
        k = len(self.experts)
        if len(self.init) != k:
            raise ValueError(f"init has {len(self.init)} values for {k} experts")
        for name, value in self.coefficients.items():
            if value.ndim != 2 or value.shape[0] != k:
                raise ValueError(
                    f"coefficients for {name} must have shape [{k}, m], "
                    f"got {list(value.shape)}"
                )

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tensors = {
            name: value.detach().to(torch.float32).cpu().contiguous()
            for name, value in self.coefficients.items()
        }
        save_file(
            tensors,
            path,
            metadata={
                "format": FORMAT,
                "method": self.method,
                "base": self.base,
                "experts": json.dumps(list(self.experts)),
                "init": json.dumps([float(x) for x in self.init]),
                "at_init": json.dumps(sorted(self.at_init)),
            },
        )

    @classmethod
    def load(cls, path: str) -> CoefficientArtifact:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"coefficients artifact {path!r} does not exist; pass the "
                f"{ARTIFACT_DIR}/{ARTIFACT_NAME} file written by a calibrated merge"
            )
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:  # safetensors raises several types
            raise ValueError(
                f"{path!r} is not a readable safetensors file: {error}"
            ) from error
        if metadata.get("format") != FORMAT:
            raise ValueError(
                f"{path!r} is not a mergekit-expert coefficients artifact "
                f"(metadata format={metadata.get('format')!r}, expected {FORMAT!r})"
            )
        missing = [
            k for k in ("method", "base", "experts", "init") if k not in metadata
        ]
        if missing:
            raise ValueError(f"{path!r} lacks metadata field(s) {missing}")
        method = metadata["method"]
        if method not in METHOD_NAMES:
            raise ValueError(
                f"{path!r} was made by method {method!r}; a coefficients artifact "
                f"belongs to one of {list(METHOD_NAMES)}"
            )
        try:
            experts, init, at_init = (
                json.loads(metadata["experts"]),
                json.loads(metadata["init"]),
                json.loads(metadata.get("at_init", "[]")),
            )
        except ValueError as error:
            raise ValueError(f"{path!r} has unreadable metadata ({error})") from None
        for name, value in tensors.items():
            _check_matrix(path, name, value, method)
        return cls(
            coefficients=tensors,
            method=method,
            base=metadata["base"],
            experts=experts,
            init=init,
            at_init=[n for n in at_init if n in tensors]
            if isinstance(at_init, list)
            else [],
        )

    def calibrated(self) -> dict[str, torch.Tensor]:
        """The coefficients calibration trained (all but ``at_init``)."""
        skip = set(self.at_init)
        return {n: a for n, a in self.coefficients.items() if n not in skip}


def _check_matrix(path: str, name: str, value: torch.Tensor, method: str) -> None:
    """A stored coefficient matrix must be finite float32 [K, m], m = 1 for stage 1."""
    problem = None
    if value.dtype != torch.float32:
        problem = f"is {str(value.dtype).replace('torch.', '')}, not float32"
    elif value.ndim != 2 or value.numel() == 0:
        problem = f"has shape {list(value.shape)}, not [experts, chunks]"
    elif not bool(torch.isfinite(value).all()):
        problem = "holds NaN or infinite values"
    elif method == "expert_merging" and value.shape[1] != 1:
        problem = f"has {value.shape[1]} chunks, but expert_merging has one per weight"
    if problem is not None:
        raise ValueError(
            f"{path!r}: the coefficients of {name} {problem}; the artifact is damaged "
            "or was edited: calibrate again, or restore the file a merge wrote"
        )
