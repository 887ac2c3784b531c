"""Resumable calibration: fingerprints of the inputs and atomic state files.

The calibration checkpoint lives in ``OUT.partial/`` (see
:mod:`mergekit_expert.output`) and is rewritten atomically after every
optimizer step. A changed config, model or data file changes the fingerprint,
and the stale state is discarded with a message. Everything is safetensors
plus JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CHECKPOINT = "checkpoint.safetensors"


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
    """Hash of the config, the model files (size and mtime) and the data (content)."""
    payload = {
        "document": document,
        "models": [_identities(p, content_hash=False) for p in model_paths],
        "data": [_identities(p, content_hash=True) for p in data_paths],
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def save_state(
    path: str, tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any]
) -> None:
    """Write tensors + JSON state to one safetensors file, atomically."""
    temporary = path + ".tmp"
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        temporary,
        metadata={"state": json.dumps(state, default=float)},
    )
    os.replace(temporary, path)


def load_state(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(path, framework="pt") as handle:
        state = json.loads((handle.metadata() or {})["state"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    return tensors, state
