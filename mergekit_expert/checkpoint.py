"""Resumable calibration: the working directory, fingerprints and atomic checkpoints.

A run works in ``OUT.partial/`` next to OUT: the teacher cache, the calibration
checkpoint (rewritten atomically after every optimizer step) and the staged
output, which replaces OUT only when it is complete. Re-running the same
command resumes from the checkpoint; a changed config, model or data file
changes the fingerprint, and the stale state is discarded with a message.
Everything is safetensors plus JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

LOG = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"


def work_dir_for(out_path: str) -> str:
    return os.path.abspath(out_path).rstrip(os.sep) + ".partial"


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


class WorkDir:
    """``OUT.partial``: where a run keeps what it needs to resume, and stages OUT."""

    def __init__(self, out_path: str, fingerprint_value: str):
        self.out_path = os.path.abspath(out_path)
        self.path = work_dir_for(out_path)
        self.fingerprint = fingerprint_value
        # Named like OUT: mergekit titles the model card after the directory.
        self.staging = os.path.join(self.path, os.path.basename(self.out_path))

    def open(self) -> None:
        """Create the directory, discarding state made for other inputs."""
        marker = os.path.join(self.path, "fingerprint.json")
        if os.path.isdir(self.path):
            previous = None
            if os.path.exists(marker):
                with open(marker, encoding="utf-8") as handle:
                    previous = json.load(handle).get("fingerprint")
            if previous != self.fingerprint:
                LOG.warning(
                    "discarding the saved calibration state in %s: the config, a model "
                    "or a calibration file changed since it was written; starting over",
                    self.path,
                )
                shutil.rmtree(self.path)
            else:
                LOG.warning(
                    "resuming from the saved calibration state in %s", self.path
                )
        os.makedirs(self.path, exist_ok=True)
        with open(marker, "w", encoding="utf-8") as handle:
            json.dump({"fingerprint": self.fingerprint}, handle)
        if os.path.isdir(self.staging):
            shutil.rmtree(self.staging)  # a half-written output is never reused

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def load(self, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        path = self.file(name)
        if not os.path.exists(path):
            return None
        try:
            return load_state(path)
        except Exception as error:  # a torn or foreign file: start that part over
            LOG.warning("ignoring unreadable %s (%s)", path, error)
            return None

    def publish(self) -> None:
        """Move the staged output into place, then drop the working directory."""
        old = None
        if os.path.lexists(self.out_path):
            old = os.path.join(self.path, "previous")
            os.replace(self.out_path, old)
        os.replace(self.staging, self.out_path)
        shutil.rmtree(self.path, ignore_errors=True)
