"""Where each model and adapter lives on disk, and whether its files may be read.

A reference is a local directory or a Hugging Face hub id; a hub id resolves to
its snapshot in the local cache (never downloaded here). Every safetensors
header is opened up front, so a damaged file is named before any work, and a
pickle-only checkpoint (whose loading can run code) needs ``--allow-pickle``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from .errors import ExpertMergingError
from .output import InputPath

LOG = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def model_dir(path: str, revision: str | None, what: str) -> str | None:
    """The local directory of a model or adapter: the path itself, or its
    snapshot in the Hugging Face cache; None when it will be downloaded."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ExpertMergingError(f"{what} {path!r} is a file, not a model directory")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, revision=revision, local_files_only=True)
    except Exception:
        if _offline():
            raise ExpertMergingError(
                f"{what} {path!r} is neither a local directory nor in the Hugging Face "
                "cache, and HF_HUB_OFFLINE is set: download it first (or unset "
                "HF_HUB_OFFLINE), or give the path of a local copy"
            ) from None
        return None


def _remote_files(path: str, revision: str | None, what: str) -> list[str]:
    from huggingface_hub import list_repo_files

    try:
        return list(list_repo_files(path, revision=revision, repo_type="model"))
    except Exception as error:
        raise ExpertMergingError(
            f"{what} {path!r} is not a local directory and the Hugging Face hub "
            f"cannot be reached or does not have it ({type(error).__name__}); check "
            "the name, or set HF_HUB_OFFLINE=1 and give the path of a local copy"
        ) from None


def check_weight_format(
    names: Iterable[str], where: str, what: str, allow_pickle: bool | None
) -> None:
    """Refuse pickle-only checkpoints (loading them can run code) unless allowed.

    ``allow_pickle`` None: no rule (plain mergekit methods load as mergekit does).
    """
    if allow_pickle is None:
        return
    names = list(names)
    if any(name.endswith(".safetensors") for name in names):
        return
    pickled = sorted(name for name in names if name.endswith(PICKLE_SUFFIXES))
    if not pickled:
        return
    if not allow_pickle:
        raise ExpertMergingError(
            f"{what} {where} has only pickle weights ({pickled[0]}); unpickling can "
            "run arbitrary code. Convert it to safetensors, or pass --allow-pickle if "
            "you trust the files"
        )
    LOG.warning("reading pickle weights of %s %s (--allow-pickle)", what, where)


def check_safetensors_files(directory: str, what: str) -> None:
    """Open every safetensors header: a corrupt or truncated file fails here."""
    from safetensors import safe_open

    for name in sorted(os.listdir(directory)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(directory, name)
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception as error:
            raise ExpertMergingError(
                f"{what}: {path} is not a valid safetensors file ({error}); it is "
                "corrupt or was not fully written: download or save it again"
            ) from None


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference with its directories on disk (None: downloaded later)."""

    reference: ModelReference
    what: str
    model_dir: str | None
    lora_dir: str | None


def resolve_models(
    named: Sequence[tuple[ModelReference, str]], allow_pickle: bool | None
) -> list[ResolvedModel]:
    """Find every model and adapter (locally or cached), check their weight files."""
    resolved = []
    for reference, what in named:
        dirs = []
        parts = [(reference.model, what)]
        if reference.lora is not None:
            parts.append((reference.lora, f"the LoRA adapter of {what}"))
        for part, label in parts:
            directory = model_dir(part.path, part.revision, label)
            if directory is None:
                names = _remote_files(part.path, part.revision, label)
                check_weight_format(names, part.path, label, allow_pickle)
            else:
                check_weight_format(
                    os.listdir(directory), directory, label, allow_pickle
                )
                check_safetensors_files(directory, label)
            dirs.append(directory)
        resolved.append(
            ResolvedModel(reference, what, dirs[0], dirs[1] if len(dirs) > 1 else None)
        )
    return resolved


def model_inputs(models: Sequence[ResolvedModel]) -> list[InputPath]:
    """The directories of these models as inputs OUT must keep clear of."""
    inputs = []
    for model in models:
        if model.model_dir:
            inputs.append(InputPath(model.model_dir, model.what))
        if model.lora_dir:
            inputs.append(
                InputPath(model.lora_dir, f"the LoRA adapter of {model.what}")
            )
    return inputs


def option_inputs(options: MergeOptions) -> list[InputPath]:
    """Caches the user pointed mergekit at: OUT must not replace them either."""
    found = []
    for path, what in (
        (options.lora_merge_cache, "the LoRA merge cache"),
        (options.transformers_cache, "the transformers cache"),
    ):
        if path and os.path.exists(path):
            found.append(InputPath(path, what))
    return found


def tokenizer_inputs(config: MergeConfiguration) -> list[InputPath]:
    """Local models a tokenizer setting reads (``tokenizer_source``,
    ``tokenizer.source``, ``tokenizer.tokens.*.source``), which mergekit's
    ``referenced_models()`` leaves out: OUT must keep clear of them too."""
    from mergekit.tokenizer.config import ModelTokenEmbedding

    found: list[tuple[ModelReference, str]] = []
    if isinstance(config.tokenizer_source, ModelReference):
        found.append((config.tokenizer_source, "the tokenizer_source model"))
    if config.tokenizer is not None:
        if isinstance(config.tokenizer.source, ModelReference):
            found.append((config.tokenizer.source, "the tokenizer.source model"))
        for token, setting in (config.tokenizer.tokens or {}).items():
            source = setting.source
            if isinstance(source, ModelTokenEmbedding):
                source = source.model
            if isinstance(source, ModelReference):
                found.append((source, f"the model of token {token!r}"))
    inputs = []
    for reference, what in found:
        for path in (reference.model.path, reference.lora and reference.lora.path):
            if path and os.path.exists(path):
                inputs.append(InputPath(path, what))
    return inputs


def header_shapes(path: str, what: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from safetensors headers; no tensor data is read."""
    from mergekit.io import ShardedTensorIndex
    from safetensors import safe_open

    try:
        index = ShardedTensorIndex.from_disk(path)
    except Exception as error:
        raise ExpertMergingError(
            f"cannot index the weight files of {what} {path}: {error}"
        ) from None
    shapes = {}
    by_file: dict[str, list[str]] = {}
    for name, shard in index.tensor_paths.items():
        by_file.setdefault(shard, []).append(name)
    for shard, names in by_file.items():
        full = os.path.join(path, shard)
        if not full.endswith(".safetensors"):
            return {}
        try:
            with safe_open(full, framework="pt") as handle:
                for name in names:
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except Exception as error:
            raise ExpertMergingError(
                f"{what}: {full} does not hold the tensors its index lists ({error}); "
                "download or save the model again"
            ) from None
    return shapes


def same_shape(
    names: Sequence[str], base_dir: str, expert_dirs: Sequence[str]
) -> list[str]:
    """The names whose tensor has the base's shape in every expert (from the
    safetensors headers): an expert that added tokens has more vocabulary rows,
    which mergekit merges by token, not by position."""
    base = header_shapes(base_dir, "the base model")
    experts = [header_shapes(d, d) for d in expert_dirs]
    return [n for n in names if n in base and all(e.get(n) == base[n] for e in experts)]
