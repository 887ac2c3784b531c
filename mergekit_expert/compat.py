"""Work-arounds for bugs of mergekit 0.1.5 that users of this plugin hit.

Each fix applies only where the bug is present, and is worth reporting
upstream. :func:`apply` runs from ``register()``, so it may run while mergekit
itself is half imported (the autoload hook fires inside ``mergekit.card``'s
import): it touches only modules complete by then. The model-card fix is
applied by the pipeline, just before it calls ``run_merge``.
"""

from __future__ import annotations

import functools
import json
import os


def apply() -> None:
    fix_mergekit_architectures()


def fix_model_card_offline() -> None:
    """Let mergekit write its model card offline for local ``dir/model`` paths.

    mergekit's ``card.is_hf`` asks the hub whether a local path with one slash
    (``models/base``) is also a hub repository; with ``HF_HUB_OFFLINE=1`` (or
    no network) that call raises and the whole write fails after the merge was
    computed. A local directory the hub cannot be asked about is local.
    """
    try:
        from mergekit import card
    except ImportError:
        return
    original = card.is_hf
    if getattr(original, "_mergekit_expert_fixed", False):
        return

    @functools.wraps(original)
    def is_hf(path: str) -> bool:
        try:
            return original(path)
        except Exception:
            if os.path.exists(path):
                return False
            raise

    is_hf._mergekit_expert_fixed = True  # type: ignore[attr-defined]
    card.is_hf = is_hf


def fix_mergekit_architectures() -> None:
    """Make mergekit's Qwen2-VL definition read the layer count from text_config.

    Its definition asks the config for a top-level ``num_hidden_layers``, which
    transformers 5 keeps only in ``text_config``; without this the final write
    of a Qwen2-VL merge fails (Qwen2.5-VL's definition already reads it there).
    """
    try:
        from mergekit.architecture.json_definitions import (
            NAME_TO_ARCH,
            _load_architecture_json,
        )
        from transformers import Qwen2VLConfig
    except ImportError:
        return
    if hasattr(Qwen2VLConfig(), "num_hidden_layers"):
        return
    import importlib.resources

    import mergekit._data.architectures as folder

    source = importlib.resources.files(folder) / "qwen2_vl.json"
    if not source.is_file():
        return
    data = json.loads(source.read_text())
    text = data.get("modules", {}).get("text_decoder", {}).get("architecture", {})
    if text.get("num_layers_config_key") != "num_hidden_layers":
        return
    text["num_layers_config_key"] = "text_config.num_hidden_layers"
    fixed = _load_architecture_json(json.dumps(data))
    for name in fixed.architectures:
        entries = NAME_TO_ARCH.get(name, [])
        entries[:] = [
            fixed if getattr(a, "expected_model_type", None) == "qwen2_vl" else a
            for a in entries
        ]
