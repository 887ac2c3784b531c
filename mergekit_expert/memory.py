"""Peak memory readers (Linux ``/proc``, ``getrusage``) and the per-stage clock.

The report gives each stage's wall time and peak resident memory; benchmarks
read the same numbers, so there is one reader of each.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


def peak_rss_bytes() -> int:
    """The process's peak resident memory since it started."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_stage_peak() -> bool:
    """Restart the kernel's peak-RSS count (Linux), so a stage reports its own peak.

    Only with ``MERGEKIT_EXPERT_STAGE_PEAKS=1`` (benchmarks): the reset also
    clears the process's ``ru_maxrss``, which outside tools read at exit.
    """
    if os.environ.get("MERGEKIT_EXPERT_STAGE_PEAKS") != "1":
        return False
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def stage_peak_bytes() -> int:
    """Peak resident memory since the last :func:`reset_stage_peak` (VmHWM)."""
    return status_field("self", "VmHWM") * 1024


def status_field(pid: int | str, name: str) -> int:
    """A numeric field of ``/proc/PID/status`` (kB fields in KiB); 0 if absent."""
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: the GPU's free memory, or the host's available RAM."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


@dataclass
class StageClock:
    """Wall time and peak resident memory at the end of each stage."""

    stages: dict[str, dict[str, float]] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        own_peak = reset_stage_peak()
        yield
        entry = {
            "wall_s": round(time.perf_counter() - start, 3),
            "peak_rss_mib": round(peak_rss_bytes() / 2**20, 1),
        }
        if own_peak:
            entry["stage_peak_rss_mib"] = round(stage_peak_bytes() / 2**20, 1)
        if torch.cuda.is_available():
            entry["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        self.stages[name] = entry
