"""Validation before any work: every check that needs no model weights.

Config keys (already checked by :mod:`mergekit_expert.config`), model
directories (local or in the Hugging Face cache), their safetensors headers,
configs and vocabularies, calibration records, an existing coefficients
artifact, the device, and where the run may write (:mod:`mergekit_expert.output`).
Every problem is an :class:`ExpertMergingError`; nothing is written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from mergekit.common import ModelReference
from mergekit.options import MergeOptions

from .coefficients import CoefficientArtifact, chunk_count
from .config import Expert, ExpertMergePlan
from .errors import ExpertMergingError
from .methods import load_artifact_cached
from .multimodal import has_processor, is_multimodal, load_processor
from .output import InputPath
from .records import CalibrationRecord, choose_records, load_records
from .sources import (
    ResolvedModel,
    header_shapes,
    model_inputs,
    option_inputs,
    resolve_models,
    tokenizer_inputs,
)
from .student import resolve_hidden_layers, select_weights
from .vocabulary import (
    VocabularyCheck,
    check_expert_vocabulary,
    embedding_rows,
    tokenizer_vocabulary,
    vocabulary_rows,
)

LOG = logging.getLogger(__name__)


@dataclass
class Checked:
    """What preflight learned, so later stages need not re-read it."""

    records: list[list[CalibrationRecord]]
    n_blocks: int
    hidden_layers: list[int]
    artifact: CoefficientArtifact | None = None
    artifact_path: str | None = None
    inputs: list[InputPath] = field(default_factory=list)
    # Per expert: how its vocabulary extends the base's (None: the same rows).
    vocabularies: list[VocabularyCheck | None] = field(default_factory=list)


def check_device(device: str | None) -> None:
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise ExpertMergingError(
            f"device {device!r} was asked for (--cuda / --device), but this torch "
            f"build ({torch.__version__}) sees no CUDA GPU; drop --cuda to run on the "
            "CPU, or install a CUDA build of torch"
        )


def _text_config(config):
    getter = getattr(config, "get_text_config", None)
    return getter() if getter else config


def preflight(
    plan: ExpertMergePlan,
    options: MergeOptions,
    coefficients: str | None,
    allow_pickle: bool = False,
    config_file: str | None = None,
) -> Checked:
    """Every check that needs no model weights; raises ExpertMergingError."""
    check_device(options.device)
    named = [(plan.base, "the base model")] + [
        (e.reference, f"expert {e.name}") for e in plan.experts
    ]
    resolved = resolve_models(named, allow_pickle)
    inputs = model_inputs(resolved) + option_inputs(options)
    inputs += tokenizer_inputs(plan.merge_config)
    if config_file is not None:
        inputs.append(InputPath(config_file, "the config file"))
    configs = check_configs(plan, named, options.trust_remote_code)
    base_config = configs[plan.base]
    vocabularies = [
        check_vocabulary(
            plan, expert, resolved[0], model, configs, options.trust_remote_code
        )
        for expert, model in zip(plan.experts, resolved[1:])
    ]
    base_shapes = check_shapes(plan, resolved, vocabularies)
    n_blocks = int(getattr(base_config, "num_hidden_layers", 0) or 0)
    settings = plan.calibration
    hidden_layers = resolve_hidden_layers(settings.hidden_layers, n_blocks)
    if settings.hidden_weight == 0:
        hidden_layers = []  # the hidden term is off: no teacher hidden states
    artifact = None
    path = coefficients or artifact_in_config(plan.coefficients, config_file)
    records: list[list[CalibrationRecord]] = []
    if path is not None:
        artifact = check_artifact(path, plan, base_shapes)
        inputs.append(InputPath(path, "the coefficients artifact"))
    else:
        records = calibration_records(plan, inputs, options.trust_remote_code)
    return Checked(
        records=records,
        n_blocks=n_blocks,
        hidden_layers=hidden_layers,
        artifact=artifact,
        artifact_path=path,
        inputs=inputs,
        vocabularies=vocabularies,
    )


def artifact_in_config(path: str | None, config_file: str | None) -> str | None:
    """A relative ``coefficients:`` path in a config file is relative to that
    file's folder (a published model's ``mergekit_config.yml`` names its own
    ``expert_merging/coefficients.safetensors``), else to the current directory."""
    if path is None or os.path.isabs(path) or config_file is None:
        return path
    beside = os.path.join(os.path.dirname(os.path.abspath(config_file)), path)
    return beside if os.path.exists(beside) else path


def check_configs(
    plan: ExpertMergePlan, named: Sequence[tuple[ModelReference, str]], trust: bool
) -> dict[ModelReference, Any]:
    """Every model's (text) config, readable."""
    configs = {}
    for reference, what in named:
        try:
            configs[reference] = _text_config(reference.config(trust_remote_code=trust))
        except Exception as error:
            raise ExpertMergingError(
                f"cannot read the config of {what}: {error}"
            ) from None
    return configs


def check_vocabulary(
    plan: ExpertMergePlan,
    expert: Expert,
    base: ResolvedModel,
    model: ResolvedModel,
    configs: Mapping[ModelReference, Any],
    trust: bool,
) -> VocabularyCheck | None:
    """None when the expert has the base's vocabulary rows; else how it extends
    them (added tokens), refused when it cannot be a fine-tune of this base or
    when the config does not say how mergekit builds the output vocabulary."""
    base_size = getattr(configs[plan.base], "vocab_size", None)
    size = getattr(configs[expert.reference], "vocab_size", None)
    if base_size is None or size is None or size == base_size:
        return None
    if base.model_dir is None or model.model_dir is None or model.lora_dir:
        raise ExpertMergingError(
            f"expert {expert.name} has vocabulary size {size} but the base has "
            f"{base_size}; an expert with added tokens must be a local (or cached) "
            "full model, not an adapter"
        )
    vocabs = []
    for directory, what in (
        (base.model_dir, "the base"),
        (model.model_dir, expert.name),
    ):
        try:
            vocabs.append(tokenizer_vocabulary(directory, trust))
        except Exception as error:
            raise ExpertMergingError(
                f"expert {expert.name} has vocabulary size {size} but the base has "
                f"{base_size}; telling added tokens from another base needs the "
                f"tokenizer of {what} ({directory}): {error}"
            ) from None
    check = check_expert_vocabulary(
        expert.name,
        vocabs[0],
        vocabs[1],
        base_size=base_size,
        expert_size=size,
        tokenizer_source=plan.merge_config.tokenizer_source
        or plan.merge_config.tokenizer,
        base_embedding=embedding_rows(base.model_dir, base_size),
        expert_embedding=embedding_rows(model.model_dir, size),
    )
    if check.moved:
        raise ExpertMergingError(
            f"expert {expert.name}'s tokenizer keeps {check.moved} of the base's "
            "tokens at other ids; calibration compares the expert and the merged "
            "model token by token and needs the base's tokens at the base's ids"
        )
    return check


def check_shapes(
    plan: ExpertMergePlan,
    resolved: Sequence[ResolvedModel],
    vocabularies: Sequence[VocabularyCheck | None],
) -> dict[str, tuple[int, ...]]:
    """Each local expert's tensors exist in the base with the same shapes (but
    the vocabulary rows of an expert that added tokens, which calibration must
    leave to mergekit's tokenizer handling); the base's shapes (empty when they
    cannot be read without loading)."""
    base_dir = resolved[0].model_dir
    if not base_dir or plan.base.lora is not None:
        return {}
    base_shapes = header_shapes(base_dir, "the base model")
    for expert, model, vocabulary in zip(plan.experts, resolved[1:], vocabularies):
        if not base_shapes or model.lora_dir is not None or model.model_dir is None:
            continue
        for name, shape in header_shapes(model.model_dir, model.what).items():
            if name not in base_shapes:
                raise ExpertMergingError(
                    f"expert {expert.name} has tensor {name} that the base model lacks; "
                    "experts must share the base's architecture"
                )
            if vocabulary is not None and vocabulary_rows(
                shape, base_shapes[name], vocabulary
            ):
                if select_weights([name], plan.calibration.exclude):
                    raise ExpertMergingError(
                        f"calibration.exclude must keep {name} at the base: its rows "
                        f"are the vocabulary, which expert {expert.name} extended; "
                        "mergekit merges them by token (tokenizer_source)"
                    )
                continue
            if base_shapes[name] != shape:
                raise ExpertMergingError(
                    f"tensor {name} has shape {list(shape)} in expert {expert.name} but "
                    f"{list(base_shapes[name])} in the base; experts must share the "
                    "base's architecture"
                )
    return base_shapes


def calibration_records(
    plan: ExpertMergePlan, inputs: list[InputPath], trust: bool
) -> list[list[CalibrationRecord]]:
    """Each expert's chosen records (all read and validated); their files and
    image folders are added to ``inputs``."""
    settings = plan.calibration
    records = []
    for k, expert in enumerate(plan.experts):
        assert expert.calibration is not None  # parse_plan requires it here
        found = load_records(expert.calibration)
        records.append(
            choose_records(
                found,
                settings.samples_per_expert,
                settings.seed + k,
                allow_fewer=settings.allow_fewer_samples,
                source=f"calibration file {expert.calibration!r} of {expert.name}",
            )
        )
        inputs.append(
            InputPath(expert.calibration, f"the calibration data of {expert.name}")
        )
        folders = {os.path.dirname(i) for record in found for i in record.images}
        inputs += [
            InputPath(folder, f"an image folder of {expert.name}")
            for folder in sorted(folders)
        ]
    for expert, chosen in zip(plan.experts, records):
        with_images = next((r for r in chosen if r.images), None)
        if with_images is not None:
            check_processor(expert, plan.base, with_images, trust)
    return records


def check_artifact(
    path: str, plan: ExpertMergePlan, base_shapes: dict[str, tuple[int, ...]]
) -> CoefficientArtifact:
    """An artifact that fits this config: its experts, method, weights and chunks."""
    try:
        artifact = load_artifact_cached(path)
    except (OSError, ValueError) as error:
        raise ExpertMergingError(str(error)) from None
    names = [e.name for e in plan.experts]
    if list(artifact.experts) != names:
        raise ExpertMergingError(
            f"coefficients artifact {path} was calibrated for experts "
            f"{list(artifact.experts)}, but the config lists {names}"
        )
    if artifact.method != plan.method:
        raise ExpertMergingError(
            f"coefficients artifact {path} was made by {artifact.method}, but the "
            f"config says merge_method: {plan.method}; use merge_method: "
            f"{artifact.method} with this artifact"
        )
    for name, matrix in artifact.coefficients.items():
        if not base_shapes:
            break
        if name not in base_shapes:
            raise ExpertMergingError(
                f"coefficients artifact {path} has weight {name}, which the "
                f"base model {plan.base} lacks"
            )
        numel = int(torch.Size(base_shapes[name]).numel())
        m = matrix.shape[1]
        if chunk_count(numel, m) != m:
            raise ExpertMergingError(
                f"coefficients artifact {path}: {name} has {m} chunk coefficients, "
                f"but its {numel} elements split into {chunk_count(numel, m)} chunks "
                "(torch.chunk layout); the artifact does not belong to this base model"
            )
    return artifact


def check_processor(
    expert: Expert, base: ModelReference, record: CalibrationRecord, trust: bool
) -> None:
    """An expert with image records needs a processor with a chat template."""
    candidates = [
        p
        for p in (expert.reference.model.path, base.model.path)
        if os.path.isdir(p) and has_processor(p)
    ]
    config = expert.reference.config(trust_remote_code=trust)
    if not is_multimodal(config) or not candidates:
        raise ExpertMergingError(
            f"{record.where}: the record has images, but expert {expert.name} is not "
            "a vision-language model with a saved processor (preprocessor_config.json)"
        )
    try:
        processor = load_processor(candidates[0], trust)
    except Exception as error:
        raise ExpertMergingError(
            f"cannot load the processor of expert {expert.name} from {candidates[0]}: "
            f"{error}"
        ) from None
    if not getattr(processor, "chat_template", None):
        raise ExpertMergingError(
            f"the processor of expert {expert.name} ({candidates[0]}) has no chat "
            "template; records with images are rendered with it"
        )
