"""Helpers shared by tests that run host entry points in a subprocess.

The reference merge here is written from the artifact's contract (README "The
coefficients artifact"): merged = base + sum_k alpha[k, s] * (expert_k - base)
on the chunks of ``torch.chunk(flat, m)``; it uses none of the plugin's code.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PTH = "mergekit_expert_autoload.pth"


def model_tensors(directory: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in os.listdir(directory):
        if name.endswith(".safetensors") and name != "coefficients.safetensors":
            tensors.update(load_file(os.path.join(directory, name)))
    return tensors


def reference_merge(
    base: dict[str, torch.Tensor],
    experts: list[dict[str, torch.Tensor]],
    coefficients: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """base + sum_k alpha_k tau_k in float64, chunk by chunk; base where unlisted."""
    merged = {}
    for name, tensor in base.items():
        if name not in coefficients:
            merged[name] = tensor.double()
            continue
        alpha = coefficients[name].double()
        flat = tensor.double().reshape(-1)
        result = flat.clone()
        for k, expert in enumerate(experts):
            delta = expert[name].double().reshape(-1) - flat
            pieces = torch.chunk(delta, alpha.shape[1])
            assert len(pieces) == alpha.shape[1]
            result += torch.cat([a * p for a, p in zip(alpha[k], pieces)])
        merged[name] = result.reshape(tensor.shape)
    return merged


def installed_pth() -> str | None:
    """The autoload .pth in this interpreter's site-packages, if installed."""
    for directory in [*site.getsitepackages(), site.getusersitepackages()]:
        if os.path.isfile(os.path.join(directory, PTH)):
            return os.path.join(directory, PTH)
    return None


def host_env(tmp_dir: Path, autoload: bool = True, **extra: str) -> dict[str, str]:
    """Environment for a host entry point run in a subprocess.

    This checkout comes first on PYTHONPATH. When the package is installed with
    its .pth (after integration), start-up runs it as it would for a user;
    otherwise a ``sitecustomize`` adds a site directory holding a copy of the
    .pth, so the very same line still runs through ``site``'s .pth processing.
    """
    env = dict(os.environ)
    env.pop("PYTHONSTARTUP", None)
    paths = [str(REPO)]
    if installed_pth() is None:
        site_dir = tmp_dir / "autoload_site"
        custom_dir = tmp_dir / "autoload_custom"
        site_dir.mkdir(exist_ok=True)
        custom_dir.mkdir(exist_ok=True)
        (site_dir / PTH).write_text((REPO / PTH).read_text())
        (custom_dir / "sitecustomize.py").write_text(
            f"import site\nsite.addsitedir({str(site_dir)!r})\n"
        )
        paths.insert(0, str(custom_dir))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["MERGEKIT_EXPERT_AUTOLOAD"] = "1" if autoload else "0"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str], cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )
