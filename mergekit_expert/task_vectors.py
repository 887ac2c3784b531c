"""Base weights and task vectors of the calibrated tensors: resident or streamed.

``resident`` keeps the base and the K task vectors of every calibrated tensor on
the compute device (fastest when they fit). ``streamed`` keeps nothing: each
projection and each weight rebuild reads the base and one expert tensor at a
time from the safetensors files and releases them, so memory does not grow
with K. Both hand out the same float32 values, so training is the same.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence

import torch
from safetensors import safe_open

from .errors import ExpertMergingError
from .memory import available_bytes

LOG = logging.getLogger(__name__)


class TaskVectors:
    """Interface: per-tensor base and task-vector rows, flat float32 on a device."""

    names: list[str]
    experts: int
    mode: str  # "resident" or "streamed", as the report names it

    def numel(self, name: str) -> int:
        raise NotImplementedError

    def base(self, name: str, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, name: str, device: torch.device) -> Iterator[torch.Tensor]:
        """tau_k of this tensor for k = 0..K-1, one at a time."""
        raise NotImplementedError

    def mean_abs(self, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """mean|tau_k| per tensor, [K] float64 (for the ++ importance)."""
        return {
            name: torch.tensor(
                [
                    float(tau.abs().mean())
                    for tau in self.rows(name, torch.device("cpu"))
                ],
                dtype=torch.float64,
            )
            for name in (self.names if names is None else names)
        }


class ResidentTaskVectors(TaskVectors):
    mode = "resident"

    def __init__(
        self, base: Mapping[str, torch.Tensor], stacked: Mapping[str, torch.Tensor]
    ):
        """``base[name]`` flat [numel]; ``stacked[name]`` [K, numel]."""
        self._base = dict(base)
        self._stacked = dict(stacked)
        self.names = list(stacked)
        self.experts = next(iter(stacked.values())).shape[0] if stacked else 0

    def numel(self, name: str) -> int:
        return self._stacked[name].shape[1]

    def base(self, name: str, device: torch.device) -> torch.Tensor:
        return self._base[name].to(device, torch.float32)

    def rows(self, name: str, device: torch.device) -> Iterator[torch.Tensor]:
        for row in self._stacked[name]:
            yield row.to(device, torch.float32)

    def stacked(self, name: str, device: torch.device) -> torch.Tensor:
        return self._stacked[name].to(device, torch.float32)


class CheckpointReader:
    """Reads single tensors of a (sharded) safetensors checkpoint, mapping nothing between reads."""

    def __init__(self, directory: str, label: str):
        from mergekit.io import ShardedTensorIndex

        self.directory = directory
        self.label = label
        self.files = ShardedTensorIndex.from_disk(directory).tensor_paths

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise ExpertMergingError(f"{self.label} has no tensor {name}")
        path = os.path.join(self.directory, self.files[name])
        if not path.endswith(".safetensors"):  # only reachable with --allow-pickle
            from mergekit.io import LazyTensorLoader, ShardedTensorIndex

            loader = LazyTensorLoader(ShardedTensorIndex.from_disk(self.directory))
            return loader.get_tensor(name).to(torch.float32)
        with safe_open(path, framework="pt") as handle:
            return handle.get_tensor(name).to(torch.float32)


class StreamedTaskVectors(TaskVectors):
    mode = "streamed"

    def __init__(
        self,
        base_dir: str,
        expert_dirs: Sequence[str],
        expert_names: Sequence[str],
        names: Sequence[str],
    ):
        self._base = CheckpointReader(base_dir, "the base model")
        self._experts = [
            CheckpointReader(d, f"expert {n}")
            for d, n in zip(expert_dirs, expert_names)
        ]
        self.names = list(names)
        self.experts = len(self._experts)
        self._numel = {}
        for name in self.names:
            with safe_open(
                os.path.join(base_dir, self._base.files[name]), "pt"
            ) as handle:
                shape = handle.get_slice(name).get_shape()
            self._numel[name] = int(torch.Size(shape).numel())

    def numel(self, name: str) -> int:
        return self._numel[name]

    def base(self, name: str, device: torch.device) -> torch.Tensor:
        return self._base.get(name).reshape(-1).to(device)

    def rows(self, name: str, device: torch.device) -> Iterator[torch.Tensor]:
        base = self.base(name, device)
        for reader in self._experts:
            yield reader.get(name).reshape(-1).to(device) - base


def choose_mode(mode: str, total_numel: int, experts: int, device: torch.device) -> str:
    """``auto``: resident when base + K task vectors (float32) use < half the free memory."""
    if mode != "auto":
        LOG.info("task vectors: %s (configured)", mode)
        return mode
    needed = (experts + 1) * total_numel * 4
    free = available_bytes(device)
    chosen = "resident" if needed < free // 2 else "streamed"
    LOG.info(
        "task vectors: %s (auto): resident needs %.2f GiB, %.2f GiB free on %s",
        chosen,
        needed / 2**30,
        free / 2**30,
        device,
    )
    return chosen


def load_task_vectors(
    mode: str,
    names: Sequence[str],
    params: dict[str, torch.nn.Parameter],
    base_dir: str,
    expert_dirs: Sequence[str],
    expert_names: Sequence[str],
) -> TaskVectors:
    """The base and tau_k = expert_k - base of each calibrated weight, resident or streamed.

    ``params``: the base model's parameters by checkpoint name.
    """
    device = params[names[0]].device
    mode = choose_mode(
        mode, sum(params[n].numel() for n in names), len(expert_dirs), device
    )
    if mode == "streamed":
        return StreamedTaskVectors(base_dir, expert_dirs, expert_names, names)
    readers = [
        CheckpointReader(d, f"expert {n}") for d, n in zip(expert_dirs, expert_names)
    ]
    base, stacked = {}, {}
    for name in names:
        flat = params[name].detach().reshape(-1).to(torch.float32)
        if not bool(torch.isfinite(flat).all()):
            raise ExpertMergingError(
                f"the base model's tensor {name} holds NaN or infinite values"
            )
        rows = []
        for expert, reader in zip(expert_names, readers):
            tensor = reader.get(name).to(flat.device)
            if tensor.numel() != flat.numel():
                raise ExpertMergingError(
                    f"tensor {name} has {tensor.numel()} elements in expert {expert} but "
                    f"{flat.numel()} in the base"
                )
            if not bool(torch.isfinite(tensor).all()):
                raise ExpertMergingError(
                    f"expert {expert}'s tensor {name} holds NaN or infinite values; "
                    "fix or re-export that checkpoint"
                )
            rows.append(tensor.reshape(-1) - flat)
        base[name] = flat.clone()
        stacked[name] = torch.stack(rows)
    return ResidentTaskVectors(base, stacked)
