"""Resident memory as the kernel counts it: peaks, per-stage peaks, other processes.

One home for the /proc readers that the pipeline's stage clock and the
benchmarks share. Standard library only, so a measurement process pays
nothing for it beyond importing this package. Linux gives the most (VmHWM and
its reset through ``clear_refs``, ``/proc/PID/status``); elsewhere only the
process peak from ``getrusage`` is available and the other readers return
0, ``False`` or ``{}``.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
from collections.abc import Iterable

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
