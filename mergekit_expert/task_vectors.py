"""Base weights and task vectors of the calibrated tensors, in four tiers.

- ``resident``: base and the K task vectors of every calibrated tensor in
  float32 on the compute device; fastest, (K + 1) x N_c x 4 bytes.
- ``compact``: base and the K experts as the checkpoints store them (bf16 /
  fp16: half the bytes) on the compute device; tau_k = expert_k - base is
  formed in float32 each time a tensor is used.
- ``host``: the same compact tensors in host memory (pinned for a GPU), copied
  to the device one tensor at a time while the previous one is computed on.
- ``streamed``: nothing kept; every use reads the base and each expert tensor
  from the safetensors files, so memory does not grow with K.

All four hand out the same float32 values (tau = float32(expert) -
float32(base) in every tier), so training is the same; ``auto`` picks the
fastest tier that fits (:func:`pick_tier`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from safetensors import safe_open

from .errors import ExpertMergingError
from .memory import available_bytes

LOG = logging.getLogger(__name__)


TIERS = ("resident", "compact", "host", "streamed")


class TaskVectors:
    """Interface: per-tensor base and task-vector rows, flat float32 on a device."""

    names: list[str]
    experts: int
    mode: str  # one of TIERS, as the report names it
    bytes_read: int = 0  # stored bytes fetched so far (benchmarks: per step)

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
        self.bytes_read += self._base[name].numel() * 4
        return self._base[name].to(device, torch.float32)

    def rows(self, name: str, device: torch.device) -> Iterator[torch.Tensor]:
        for row in self._stacked[name]:
            self.bytes_read += row.numel() * 4
            yield row.to(device, torch.float32)

    def stacked(self, name: str, device: torch.device) -> torch.Tensor:
        self.bytes_read += self._stacked[name].numel() * 4
        return self._stacked[name].to(device, torch.float32)


class CheckpointReader:
    """Reads single tensors of a (sharded) safetensors checkpoint, mapping nothing between reads."""

    def __init__(self, directory: str, label: str):
        from mergekit.io import ShardedTensorIndex

        self.directory = directory
        self.label = label
        self.files = ShardedTensorIndex.from_disk(directory).tensor_paths

    def get(self, name: str) -> torch.Tensor:
        """The tensor in float32."""
        return self.get_stored(name).to(torch.float32)

    def get_stored(self, name: str) -> torch.Tensor:
        """The tensor in the dtype the checkpoint stores."""
        if name not in self.files:
            raise ExpertMergingError(f"{self.label} has no tensor {name}")
        path = os.path.join(self.directory, self.files[name])
        if not path.endswith(".safetensors"):  # only reachable with --allow-pickle
            from mergekit.io import LazyTensorLoader, ShardedTensorIndex

            loader = LazyTensorLoader(ShardedTensorIndex.from_disk(self.directory))
            return loader.get_tensor(name)
        with safe_open(path, framework="pt") as handle:
            return handle.get_tensor(name)


class StreamedTaskVectors(TaskVectors):
    mode = "streamed"

    def __init__(
        self,
        base: CheckpointReader,
        experts: Sequence[CheckpointReader],
        names: Sequence[str],
    ):
        self._base = base
        self._experts = list(experts)
        self.names = list(names)
        self.experts = len(self._experts)
        self._numel = {}
        for name in self.names:
            with safe_open(
                os.path.join(base.directory, base.files[name]), "pt"
            ) as handle:
                shape = handle.get_slice(name).get_shape()
            self._numel[name] = int(torch.Size(shape).numel())

    def numel(self, name: str) -> int:
        return self._numel[name]

    def base(self, name: str, device: torch.device) -> torch.Tensor:
        return self._read(self._base, name).to(device)

    def rows(self, name: str, device: torch.device) -> Iterator[torch.Tensor]:
        base = self.base(name, device)
        for reader in self._experts:
            yield self._read(reader, name).to(device) - base

    def _read(self, reader: CheckpointReader, name: str) -> torch.Tensor:
        stored = reader.get_stored(name)
        self.bytes_read += stored.numel() * stored.element_size()
        return stored.reshape(-1).to(torch.float32)


class StoredTaskVectors(TaskVectors):
    """Tiers ``compact`` and ``host``: per tensor one [K + 1, numel] block, the
    base and the K experts in their checkpoint dtype (row 0: the base).

    ``host`` keeps the blocks in host memory; on a GPU they are pinned and the
    next tensor's block is copied on a side stream while the current one is
    used (the student walks the tensors in ``names`` order, for the rebuild
    and for the projection alike).
    """

    def __init__(self, mode: str, blocks: Mapping[str, torch.Tensor]):
        self.mode = mode
        self._blocks = dict(blocks)
        self.names = list(blocks)
        self.experts = next(iter(blocks.values())).shape[0] - 1 if blocks else 0
        # the block last fetched, with its base row in float32
        self._current: tuple[str, torch.device, torch.Tensor, torch.Tensor] | None = (
            None
        )
        self._next: tuple[str, torch.Tensor, Any] | None = None  # prefetched block
        self._stream: Any = None  # the side stream of the host-to-device copies

    def numel(self, name: str) -> int:
        return self._blocks[name].shape[1]

    def base(self, name: str, device: torch.device) -> torch.Tensor:
        return self._block(name, device)[1]

    def rows(self, name: str, device: torch.device) -> Iterator[torch.Tensor]:
        block, base = self._block(name, device)
        for k in range(1, block.shape[0]):
            yield block[k].to(torch.float32) - base

    def _block(
        self, name: str, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This tensor's block on ``device`` and its base row in float32 (one
        block cached: base() and rows() of one tensor fetch and upcast once;
        callers never write into the base they are given)."""
        if self._current is not None and self._current[:2] == (name, device):
            return self._current[2], self._current[3]
        stored = self._blocks[name]
        self.bytes_read += stored.numel() * stored.element_size()
        if device.type == "cuda" and stored.device.type == "cpu":
            block = self._copy_in(name, device)
        else:
            block = stored.to(device)
        base = block[0].to(torch.float32)
        self._current = (name, device, block, base)
        return block, base

    def _copy_in(self, name: str, device: torch.device) -> torch.Tensor:
        """The prefetched block if it is this one, else a plain copy; then
        start copying the next tensor's block on a side stream."""
        current = torch.cuda.current_stream(device)
        if self._next is not None and self._next[0] == name:
            _, block, event = self._next
            current.wait_event(event)
            block.record_stream(current)
        else:
            block = self._blocks[name].to(device, non_blocking=True)
        self._next = None
        following = self.names[(self.names.index(name) + 1) % len(self.names)]
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        stream = self._stream
        with torch.cuda.stream(stream):
            upcoming = self._blocks[following].to(device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        self._next = (following, upcoming, event)
        return block


def pick_tier(
    experts: int,
    numel: int,
    stored_bytes: int,
    device_free: int,
    host_free: int,
    gpu: bool,
) -> tuple[str, str]:
    """``auto``'s rule: the fastest tier whose tensors take under half the free
    memory where they live; returns (tier, why).

    resident needs (K + 1) x N_c x 4 bytes on the device, compact (K + 1) x
    N_c x ``stored_bytes`` there (only worth it below 4 bytes), host the
    same in host memory (only on a GPU: on the CPU, host memory is the
    device's); else streamed.
    """
    gib = 2**30
    resident = (experts + 1) * numel * 4
    compact = (experts + 1) * numel * stored_bytes
    where = "the GPU" if gpu else "host memory"
    if resident < device_free // 2:
        return "resident", (
            f"float32 base and task vectors ({resident / gib:.2f} GiB) fit in half "
            f"the free {device_free / gib:.2f} GiB of {where}"
        )
    if stored_bytes < 4 and compact < device_free // 2:
        return "compact", (
            f"float32 needs {resident / gib:.2f} GiB, over half the free "
            f"{device_free / gib:.2f} GiB of {where}; the checkpoint-dtype tensors "
            f"({compact / gib:.2f} GiB) fit"
        )
    if gpu and compact < host_free // 2:
        return "host", (
            f"{compact / gib:.2f} GiB of checkpoint-dtype tensors do not fit in half "
            f"the GPU's free {device_free / gib:.2f} GiB but fit in half the "
            f"free {host_free / gib:.2f} GiB of host memory"
        )
    return "streamed", (
        f"{compact / gib:.2f} GiB of base and task vectors fit in half of no "
        f"memory (device {device_free / gib:.2f} GiB free, host "
        f"{host_free / gib:.2f} GiB free); read from the files at every use"
    )


def choose_mode(
    mode: str, numel: int, experts: int, stored_bytes: int, device: torch.device
) -> str:
    """The configured tier, or ``auto``'s choice (logged with its reason)."""
    if mode != "auto":
        LOG.info("task vectors: %s (configured)", mode)
        return mode
    host_free = available_bytes(torch.device("cpu"))
    device_free = available_bytes(device) if device.type == "cuda" else host_free
    chosen, why = pick_tier(
        experts, numel, stored_bytes, device_free, host_free, device.type == "cuda"
    )
    LOG.info("task vectors: %s (auto): %s", chosen, why)
    return chosen


def load_task_vectors(
    mode: str,
    names: Sequence[str],
    params: dict[str, torch.nn.Parameter],
    base_dir: str,
    expert_dirs: Sequence[str],
    expert_names: Sequence[str],
) -> TaskVectors:
    """The base and tau_k = expert_k - base of each calibrated weight, in the
    configured tier (or ``auto``'s).

    ``params``: the base model's parameters by checkpoint name.
    """
    device = params[names[0]].device
    base_reader = CheckpointReader(base_dir, "the base model")
    readers = [
        CheckpointReader(d, f"expert {n}") for d, n in zip(expert_dirs, expert_names)
    ]
    stored_bytes = base_reader.get_stored(names[0]).element_size()
    mode = choose_mode(
        mode,
        sum(params[n].numel() for n in names),
        len(expert_dirs),
        stored_bytes,
        device,
    )
    if mode == "streamed":
        return StreamedTaskVectors(base_reader, readers, names)
    if mode in ("compact", "host"):
        home = device if mode == "compact" else torch.device("cpu")
        pin = mode == "host" and device.type == "cuda"
        blocks = {}
        for name in names:
            tensors = [base_reader.get_stored(name).reshape(-1)]
            tensors += [
                _checked(name, r, e, tensors[0]) for r, e in zip(readers, expert_names)
            ]
            _check_finite_base(name, tensors[0])
            dtype = tensors[0].dtype
            for tensor in tensors[1:]:
                dtype = torch.promote_types(dtype, tensor.dtype)
            block = torch.stack([t.to(dtype) for t in tensors]).to(home)
            blocks[name] = block.pin_memory() if pin else block
        return StoredTaskVectors(mode, blocks)
    base, stacked = {}, {}
    for name in names:
        flat = params[name].detach().reshape(-1).to(torch.float32)
        _check_finite_base(name, flat)
        rows = [
            _checked(name, reader, expert, flat).to(flat.device, torch.float32) - flat
            for reader, expert in zip(readers, expert_names)
        ]
        base[name] = flat.clone()
        stacked[name] = torch.stack(rows)
    return ResidentTaskVectors(base, stacked)


def _check_finite_base(name: str, flat: torch.Tensor) -> None:
    if not bool(torch.isfinite(flat).all()):
        raise ExpertMergingError(
            f"the base model's tensor {name} holds NaN or infinite values"
        )


def _checked(
    name: str, reader: CheckpointReader, expert: str, base: torch.Tensor
) -> torch.Tensor:
    """Expert ``expert``'s tensor ``name`` as stored, flat, checked against the base."""
    tensor = reader.get_stored(name).reshape(-1)
    if tensor.numel() != base.numel():
        raise ExpertMergingError(
            f"tensor {name} has {tensor.numel()} elements in expert {expert} but "
            f"{base.numel()} in the base"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise ExpertMergingError(
            f"expert {expert}'s tensor {name} holds NaN or infinite values; "
            "fix or re-export that checkpoint"
        )
    return tensor
