"""Tiny Llama models: a config builder, saving, and experts = base + seeded noise.

Random weights are all most fixtures need: the merge arithmetic, resuming,
memory and time depend on the shapes, not on what the weights know. An
"expert" is then the base moved by seeded Gaussian noise, which gives every
expert the same architecture and a known task vector.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, TypeVar

import torch

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedModel


def llama_config(
    vocab_size: int,
    *,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    kv_heads: int | None = None,
    max_positions: int = 256,
    tie_embeddings: bool = False,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    pad_token_id: int = 3,
) -> LlamaConfig:
    """A Llama config of the given shape (``kv_heads`` defaults to ``heads``)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads if kv_heads is None else kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def token_ids(tokenizer) -> dict[str, int]:
    """The BOS / EOS / PAD ids of ``tokenizer``, as :func:`llama_config` takes them."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def tiny_config(vocab_size: int, layers: int = 2, hidden: int = 32) -> LlamaConfig:
    """The test suite's shape: 4 heads sharing 2 KV heads, untied embeddings."""
    return llama_config(
        vocab_size,
        hidden=hidden,
        intermediate=2 * hidden,
        layers=layers,
        heads=4,
        kv_heads=2,
    )


def save_pretrained(model: PreTrainedModel, tokenizer, directory: str) -> str:
    """Model (safetensors) and tokenizer in one directory, as a hub repository."""
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return os.fspath(directory)


ModelT = TypeVar("ModelT", bound=torch.nn.Module)


def add_noise_(
    model: ModelT,
    seed: int,
    scale: float,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> ModelT:
    """Every parameter := reference + scale * N(0, 1), in place; returns ``model``.

    ``reference`` (parameter name -> tensor) defaults to the parameters
    themselves. The noise is float32, drawn from one generator seeded with
    ``seed`` on the model's device, parameter by parameter in
    ``named_parameters`` order; the sum is computed in float32 and stored in
    the parameter's dtype. Reusing one model with a saved reference builds
    any number of experts in the memory of one.
    """
    parameters = list(model.named_parameters())
    device = parameters[0][1].device if parameters else torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, parameter in parameters:
            noise = torch.randn(
                parameter.shape, generator=generator, device=device, dtype=torch.float32
            )
            start = parameter if reference is None else reference[name]
            parameter.copy_((start.float() + scale * noise).to(parameter.dtype))
    return model


def noisy_copy(base: ModelT, seed: int, scale: float = 0.05) -> ModelT:
    """A copy of ``base`` with every tensor moved by seeded noise (an "expert")."""
    return add_noise_(copy.deepcopy(base), seed, scale)
