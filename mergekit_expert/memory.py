"""Resident memory as the kernel counts it: peaks, per-stage peaks, other processes.

One home for the /proc readers that the pipeline's stage clock and the
benchmarks share. Standard library only at import (torch is imported by the
functions that need it), so a measurement process pays
nothing for it beyond importing this package. Linux gives the most (VmHWM and
its reset through ``clear_refs``, ``/proc/PID/status``); elsewhere only the
process peak from ``getrusage`` is available and the other readers return
0, ``False`` or ``{}``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

STAGE_PEAKS = "MERGEKIT_EXPERT_STAGE_PEAKS"


def peak_rss_bytes() -> int:
    """The process's peak resident memory since it started."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak() -> bool:
    """Restart the kernel's peak-RSS count (VmHWM) of this process (Linux).

    The reset also clears the process's ``ru_maxrss``. False where the kernel
    offers no reset.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def reset_stage_peak() -> bool:
    """Restart the kernel's peak-RSS count (Linux), so a stage reports its own peak.

    Only with ``MERGEKIT_EXPERT_STAGE_PEAKS=1`` (benchmarks): the reset also
    clears the process's ``ru_maxrss``, which outside tools read at exit.
    """
    if os.environ.get(STAGE_PEAKS) != "1":
        return False
    return reset_peak()


def stage_peak_bytes() -> int:
    """Peak resident memory since the last :func:`reset_stage_peak` (VmHWM)."""
    return status_bytes("self", ("VmHWM",)).get("VmHWM", 0)


def status_bytes(pid: int | str = "self", fields: Iterable[str] = ()) -> dict[str, int]:
    """Memory fields of ``/proc/PID/status`` (VmRSS, VmHWM, RssAnon, ...) in bytes.

    One read of the file, so the fields are consistent with each other; the
    fields the kernel does not report are left out, and a process that is
    gone (or a system without /proc) gives ``{}``.
    """
    wanted = set(fields)
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in wanted:
                    values[key] = int(rest.split()[0]) * 1024  # the kernel's kB
    except (OSError, ValueError, IndexError):
        return {}
    return values


def release_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps large freed temporaries
    otherwise, so peak RSS would drift with the number of steps)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


def available_bytes(device) -> int:
    """Free memory on a torch ``device``: the GPU's free memory, or the host's
    available RAM."""
    if device.type == "cuda":
        import torch

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
        import torch

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
