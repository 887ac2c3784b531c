"""What vision-language experts need beyond text LLMs.

Three things differ for a model such as Qwen2-VL: it is loaded with its own
auto class (``AutoModelForImageTextToText``, not ``AutoModelForCausalLM``),
its inputs come from a processor (tokenizer + image processor + chat
template), and transformers 5 renames its weights on load (the checkpoint's
``model.layers.*`` / ``visual.*`` become ``model.language_model.layers.*`` /
``model.visual.*`` in memory). Coefficients, the artifact and mergekit all
speak the checkpoint's names, so the student maps its parameters back to them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable

import torch

from .errors import ExpertMergingError

LOG = logging.getLogger(__name__)


def model_class(config):
    """The transformers auto class that loads this config with its LM head."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if type(config) in AutoModelForCausalLM._model_mapping:
        return AutoModelForCausalLM
    if type(config) in AutoModelForImageTextToText._model_mapping:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM  # raises transformers' own explanatory error


def is_multimodal(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def has_processor(path: str) -> bool:
    return any(
        os.path.exists(os.path.join(path, name))
        for name in ("preprocessor_config.json", "processor_config.json")
    )


def load_processor(path: str, trust_remote_code: bool = False):
    """The model's own processor (``AutoProcessor``).

    Some processors also build a video processor, which needs torchvision; when
    that is missing, the processor is assembled from the model's tokenizer and
    image processor with no video processor (calibration uses images only).
    """
    from transformers import (
        AutoImageProcessor,
        AutoProcessor,
        AutoTokenizer,
        ProcessorMixin,
    )

    try:
        processor = AutoProcessor.from_pretrained(
            path, trust_remote_code=trust_remote_code
        )
        if isinstance(processor, ProcessorMixin):
            return processor
        raise ExpertMergingError(
            f"{path} has no multimodal processor (AutoProcessor returned "
            f"{type(processor).__name__}); save the model's processor next to it"
        )
    except ImportError as error:
        LOG.info("AutoProcessor unavailable for %s (%s); images only", path, error)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    images = AutoImageProcessor.from_pretrained(
        path, trust_remote_code=trust_remote_code
    )
    cls = _processor_class(path)
    template = tokenizer.chat_template or _saved_chat_template(path)

    class ImageOnlyProcessor(cls):  # type: ignore[valid-type, misc]
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=template,
    )


def _processor_class(path: str):
    import transformers

    for name in ("processor_config.json", "preprocessor_config.json"):
        file = os.path.join(path, name)
        if os.path.exists(file):
            with open(file, encoding="utf-8") as handle:
                found = json.load(handle).get("processor_class")
            if found and hasattr(transformers, found):
                return getattr(transformers, found)
    raise ExpertMergingError(
        f"cannot tell the processor class of {path}: no processor_class in its "
        "preprocessor_config.json"
    )


def _saved_chat_template(path: str) -> str | None:
    file = os.path.join(path, "chat_template.json")
    if os.path.exists(file):
        with open(file, encoding="utf-8") as handle:
            return json.load(handle).get("chat_template")
    return None


def checkpoint_parameters(
    model: torch.nn.Module, checkpoint_names: Iterable[str]
) -> dict[str, torch.nn.Parameter]:
    """The model's parameters keyed by their names in the checkpoint files.

    Parameters whose in-memory name is not in the checkpoint are named as
    transformers would save them (``revert_weight_conversion``); a parameter
    that maps to no checkpoint tensor (a fused or generated one) is left out.
    """
    on_disk = set(checkpoint_names)
    params = dict(model.named_parameters())
    result = {n: p for n, p in params.items() if n in on_disk}
    missing = {n: p for n, p in params.items() if n not in on_disk}
    if not missing:
        return result
    try:
        from transformers.core_model_loading import revert_weight_conversion

        reverted = revert_weight_conversion(model, dict(missing))  # type: ignore[arg-type]
    except Exception as error:  # no mapping in this transformers version
        LOG.debug("no weight-name conversion available: %s", error)
        reverted = {}
    by_identity = {id(p): n for n, p in missing.items()}
    for disk_name, tensor in reverted.items():
        memory_name = by_identity.get(id(tensor))
        if memory_name is not None and disk_name in on_disk:
            result[disk_name] = missing.pop(memory_name)
    if missing:
        LOG.info(
            "%d parameters have no tensor of their own in the checkpoint (e.g. %s); "
            "they keep the base's values",
            len(missing),
            next(iter(missing)),
        )
    return result
