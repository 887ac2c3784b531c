"""The calibration state a killed run resumes from, as one typed object, and the
fingerprint of the inputs it belongs to.

It holds what finished phases produced (the initial alphas and their curve,
stage 1's history and raw coefficients) and the loop in flight (its position,
coefficients, kept snapshot, optimizer and schedule). :func:`save_state` and
:func:`load_state` are the only places it meets the file format: one
safetensors file of tensors plus a JSON document in its metadata, rewritten
atomically after every optimizer step, so nothing is ever unpickled. A
changed config, model or data file changes the fingerprint, and the stale
state is discarded with a message (:class:`mergekit_expert.output.WorkDir`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .train import LoopState, TrainHistory

CHECKPOINT = "checkpoint.safetensors"
VERSION = 2


@dataclass
class LoopCheckpoint:
    """A training loop in flight: enough to continue it bit for bit."""

    phase: str  # "stage1" or "stage2"
    loop: LoopState
    raw: dict[str, torch.Tensor]
    kept: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None


@dataclass
class CalibrationState:
    init: list[float] | None = None
    init_curve: list[dict] = field(default_factory=list)
    init_selection: dict | None = None  # init: auto's held-out fits
    reg_selection: dict | None = None  # reg_weight: auto's choice
    stage2_check: dict | None = None  # ++: whether stage 2 is kept (held-out)
    stage1: TrainHistory | None = None
    stage1_raw: dict[str, torch.Tensor] = field(default_factory=dict)
    loop: LoopCheckpoint | None = None
    resumed: bool = False  # read back from a file

    def loop_for(self, phase: str) -> LoopCheckpoint | None:
        return self.loop if self.loop is not None and self.loop.phase == phase else None


def save_state(path: str, state: CalibrationState) -> None:
    """Write the state to one safetensors file, atomically."""
    tensors = {f"stage1_raw/{n}": t for n, t in state.stage1_raw.items()}
    document: dict[str, Any] = {
        "version": VERSION,
        "init": state.init,
        "init_curve": state.init_curve,
        "init_selection": state.init_selection,
        "reg_selection": state.reg_selection,
        "stage2_check": state.stage2_check,
        "stage1": dict(state.stage1.__dict__) if state.stage1 else None,
        "loop": None,
    }
    if state.loop is not None:
        loop = state.loop
        tensors.update({f"raw/{n}": t for n, t in loop.raw.items()})
        tensors.update({f"kept/{n}": t for n, t in loop.kept.items()})
        document["loop"] = {
            "phase": loop.phase,
            "state": loop.loop.to_json(),
            "optimizer": _optimizer_to(loop.optimizer, tensors),
            "scheduler": loop.scheduler,
        }
    temporary = path + ".tmp"
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        temporary,
        metadata={"state": json.dumps(document, default=float)},
    )
    os.replace(temporary, path)


def load_state(path: str) -> CalibrationState:
    """The state :func:`save_state` wrote; ValueError for another format."""
    with safe_open(path, framework="pt") as handle:
        document = json.loads((handle.metadata() or {})["state"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if document.get("version") != VERSION:
        raise ValueError(f"state format {document.get('version')}, not {VERSION}")
    state = CalibrationState(
        init=document["init"],
        init_curve=document["init_curve"],
        init_selection=document.get("init_selection"),
        reg_selection=document.get("reg_selection"),
        stage2_check=document.get("stage2_check"),
        stage1=TrainHistory(**document["stage1"]) if document["stage1"] else None,
        stage1_raw=_prefixed(tensors, "stage1_raw/"),
        resumed=True,
    )
    loop = document["loop"]
    if loop is not None:
        state.loop = LoopCheckpoint(
            phase=loop["phase"],
            loop=LoopState.from_json(loop["state"]),
            raw=_prefixed(tensors, "raw/"),
            kept=_prefixed(tensors, "kept/"),
            optimizer=_optimizer_from(tensors, loop["optimizer"]),
            scheduler=loop["scheduler"],
        )
    return state


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _optimizer_to(
    state_dict: dict[str, Any] | None, tensors: dict[str, torch.Tensor]
) -> dict | None:
    """The optimizer's JSON part; its tensors go into ``tensors``."""
    if state_dict is None:
        return None
    meta: dict[str, Any] = {"param_groups": state_dict["param_groups"], "state": {}}
    for index, values in state_dict["state"].items():
        meta["state"][str(index)] = sorted(values)
        for key, value in values.items():
            tensors[f"optimizer/{index}/{key}"] = torch.as_tensor(value)
    return meta


def _optimizer_from(tensors: dict[str, torch.Tensor], meta: dict | None) -> dict | None:
    if meta is None:
        return None
    return {
        "param_groups": meta["param_groups"],
        "state": {
            int(index): {key: tensors[f"optimizer/{index}/{key}"] for key in keys}
            for index, keys in meta["state"].items()
        },
    }


def _file_identity(path: str) -> list:
    stat = os.stat(path)
    return [os.path.basename(path), stat.st_size, stat.st_mtime_ns]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _identities(path: str, content_hash: bool) -> list:
    """Identity of a file or of every file in a directory (size+mtime, or sha256)."""
    if not os.path.exists(path):
        return [path, None]
    files = (
        [path]
        if os.path.isfile(path)
        else sorted(
            os.path.join(root, name)
            for root, _, names in os.walk(path)
            for name in names
        )
    )
    if content_hash:
        return [
            [os.path.relpath(f, path) if f != path else "", _sha256(f)] for f in files
        ]
    return [_file_identity(f) for f in files]


def fingerprint(
    document: Mapping, model_paths: list[str], data_paths: list[str]
) -> str:
    """Hash of the config, the model files (size and mtime), the data (content)
    and this package's version (a state saved by another release may mean
    other arithmetic: it is not resumed)."""
    from . import __version__  # the one the report records

    payload = {
        "version": __version__,
        "document": document,
        "models": [_identities(p, content_hash=False) for p in model_paths],
        "data": [_identities(p, content_hash=True) for p in data_paths],
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
