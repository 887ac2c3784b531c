"""Hand-merge oracles: what a merged model must hold, computed the naive way.

    merged = base + sum_k sum_s alpha[k, s] * (expert_k - base)[chunk s]

with the chunks of ``torch.chunk``, everything in float64, read straight
from the safetensors files, and a LoRA expert rebuilt from its adapter files
as ``base + lora_alpha / r * B @ A``. Independent of the code under test on
purpose: nothing here imports ``mergekit_expert``'s coefficients, methods,
student or task-vector code, so a bug there cannot hide in the expectation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import torch
from safetensors.torch import load_file


def load_tensors(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory (all ``*.safetensors`` but an artifact)."""
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors") and name != "coefficients.safetensors":
            tensors.update(load_file(os.path.join(directory, name)))
    return tensors


def lora_delta(adapter_dir: str) -> dict[str, torch.Tensor]:
    """scale * B @ A per targeted weight, computed by hand from the adapter files."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as handle:
        config = json.load(handle)
    scale = config["lora_alpha"] / config["r"]
    weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    deltas = {}
    for key, a in weights.items():
        if ".lora_A." in key:
            b = weights[key.replace(".lora_A.", ".lora_B.")]
            name = key.replace("base_model.model.", "").replace(".lora_A", "")
            deltas[name] = scale * (b @ a)
    return deltas


def expert_tensors(reference: str) -> dict[str, torch.Tensor]:
    """A model directory's tensors, or base + adapter for mergekit's ``base+adapter``."""
    if "+" not in reference:
        return load_tensors(reference)
    base_dir, adapter_dir = reference.split("+")
    base = load_tensors(base_dir)
    delta = lora_delta(adapter_dir)
    assert delta, "the LoRA adapter must target some weights"
    return {n: t + delta[n] if n in delta else t for n, t in base.items()}


def hand_merge(
    base: torch.Tensor, experts: Sequence[torch.Tensor], alphas
) -> torch.Tensor:
    """base + sum_k sum_s alphas[k][s] * tau_k[chunk s], float64, base's shape.

    ``alphas``: one row of chunk coefficients per expert (a [K, S] tensor or
    nested lists); the chunks of tau_k = expert_k - base are torch.chunk's.
    """
    flat = base.reshape(-1).double().clone()
    for expert, row in zip(experts, alphas, strict=True):
        row = [float(a) for a in row]
        tau = expert.reshape(-1).double() - base.reshape(-1).double()
        pieces = torch.chunk(tau, len(row))
        assert len(pieces) == len(row), (
            f"{len(row)} coefficients, torch.chunk gives {len(pieces)} chunks"
        )
        offset = 0
        for coefficient, piece in zip(row, pieces):
            flat[offset : offset + len(piece)] += coefficient * piece
            offset += len(piece)
    return flat.reshape(base.shape)


def expected_model(
    base_dir: str,
    expert_refs: Sequence[str],
    coefficients: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Every tensor of the merged model, float64: hand-merged where there are
    coefficients, the base's everywhere else."""
    base = load_tensors(base_dir)
    experts = [expert_tensors(ref) for ref in expert_refs]
    return {
        name: hand_merge(tensor, [e[name] for e in experts], coefficients[name])
        if name in coefficients
        else tensor.double()
        for name, tensor in base.items()
    }
