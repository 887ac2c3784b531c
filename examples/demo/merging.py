"""Merge configs and runs: one entry of ``MERGES`` per merged row of the table.

Every method is run through its own command-line tool exactly as a user would
run it (``mergekit-yaml`` or ``mergekit-expert``), so the demo exercises the
real entry points. A method whose tool is missing or fails is reported and
skipped, so the rest of the demo still runs, and the demo then exits non-zero.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

# Builds one expert's ``parameters:`` from its domain's calibration file.
ParamsFn = Callable[[Path], dict]
# The paper's 5 of each expert's 20 records: the default (samples_per_expert:
# auto) takes all 20, which made one expert_merging run take several times as
# long, too long for a first look (README "The demo").
DEMO_CALIBRATION = {"samples_per_expert": 5}


def weight(value: float) -> ParamsFn:
    """Fixed per-expert weight, as task arithmetic uses it."""
    return lambda _calibration: {"weight": value}


def calibration(path: Path) -> dict:
    """Point the expert at its calibration set, as expert merging uses it."""
    return {"calibration": str(path.resolve())}


@dataclass(frozen=True)
class Merge:
    """One merge method: row label, ``merge_method``, CLI and per-expert parameters."""

    label: str
    method: str
    cli: str
    params: ParamsFn


MERGES: list[Merge] = [
    Merge("task_arithmetic (λ=0.3)", "task_arithmetic", "mergekit-yaml", weight(0.3)),
    Merge("expert_merging", "expert_merging", "mergekit-expert", calibration),
    Merge("expert_merging_pp", "expert_merging_pp", "mergekit-expert", calibration),
]


def write_config(
    merge: Merge,
    model_dir: Path,
    experts: list[str],
    calib: dict[str, Path],
    path: Path,
) -> None:
    """Write the merge YAML with absolute paths, so it runs from any directory."""
    config = {
        "merge_method": merge.method,
        "base_model": str((model_dir / "base").resolve()),
        "models": [
            {
                "model": str((model_dir / e).resolve()),
                "parameters": merge.params(calib[e]),
            }
            for e in experts
        ],
        "dtype": "float32",
    }
    if merge.cli == "mergekit-expert":
        config["calibration"] = DEMO_CALIBRATION
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def run_merge(merge: Merge, config: Path, out: Path, log: Path) -> str | None:
    """Run the method's CLI; return None on success or a short error message."""
    cli = Path(sys.executable).parent / merge.cli
    if not cli.exists():
        return f"{cli} not found (is the package installed in this environment?)"
    if out.exists():
        shutil.rmtree(out)  # never evaluate a stale merge from an earlier run
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as handle:
        proc = subprocess.run(
            [str(cli), str(config), str(out)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=False,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},  # local paths only
        )
    print(
        f"  {merge.cli} {config.name}: exit {proc.returncode} "
        f"in {time.perf_counter() - start:.1f}s (log: {log})"
    )
    if proc.returncode != 0:
        tail = (
            log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        )
        return f"{merge.cli} exited with {proc.returncode}:\n    " + "\n    ".join(tail)
    return None
