"""Data parallel calibration over torch.distributed (started with torchrun).

Every rank holds the same student and coefficients. Calibration samples are
owned round-robin (sample i by rank i mod world); each rank runs the teacher
pass and the forward/backward passes of its own samples only, then the tiny
[K, m] coefficient gradients (and the loss sums) are all-reduced, so every
rank takes the same optimizer step as a single process with the same global
batch. Rank 0 alone writes the checkpoint, the artifact, the model and the
report.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

_joined = False  # whether setup() created the process group (so leave() ends it)


def leave() -> None:
    """End the process group setup() joined. A group still alive when the
    interpreter exits can abort the process from its threads ("terminate
    called without an active exception"), failing a run that had finished."""
    global _joined
    if _joined and dist.is_initialized():
        dist.destroy_process_group()
    _joined = False


def setup(device: str) -> str:
    """Join the process group torchrun describes (if any); returns this rank's device.

    ``auto`` is the GPU when there is one, else the CPU.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    global _joined
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        _joined = True
    if world_size() > 1 and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return device


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def owns(sample_index: int) -> bool:
    return sample_index % world_size() == rank()


def all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each tensor over ranks (one collective for all of them)."""
    if world_size() == 1 or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flat = flat.to(backend_device)
    dist.all_reduce(flat)
    out, offset = [], 0
    for t in tensors:
        out.append(
            flat[offset : offset + t.numel()].reshape(t.shape).to(t.device, t.dtype)
        )
        offset += t.numel()
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def gather_lists(values: list) -> list:
    """Concatenate a Python list from every rank (rank order)."""
    if world_size() == 1:
        return values
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, values)
    return [v for part in gathered for v in part]
