"""Where and in which precision calibration runs its models (device, dtype,
accelerate device maps, activation checkpointing)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .multimodal import model_class

if TYPE_CHECKING:
    from mergekit.options import MergeOptions

    from .config import CalibrationConfig


def resolve_precision(name: str, device: str) -> torch.dtype:
    """``auto``: float32 on the CPU, bfloat16 on a GPU that supports it, else float16."""
    if name != "auto":
        return getattr(torch, name)
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclass(frozen=True)
class Placement:
    """Where and in which precision calibration runs its models.

    Weights are held in ``dtype`` and forward passes run under autocast to it;
    coefficient math (merging, projection, optimizer) always stays float32.
    ``device_map`` shards a model over devices with accelerate.
    """

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    device_map: str | dict | None = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False

    @classmethod
    def for_run(cls, settings: CalibrationConfig, options: MergeOptions) -> Placement:
        """The placement the ``calibration:`` settings and CLI options ask for."""
        device = options.device or "cpu"
        return cls(
            device=device,
            dtype=resolve_precision(settings.precision, device),
            device_map=settings.device_map,
            gradient_checkpointing=settings.gradient_checkpointing,
            trust_remote_code=options.trust_remote_code,
        )

    def load(self, path: str, student: bool = False):
        from transformers import AutoConfig

        kwargs = {"dtype": self.dtype, "trust_remote_code": self.trust_remote_code}
        config = AutoConfig.from_pretrained(
            path, trust_remote_code=self.trust_remote_code
        )
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        with _quiet_loading():  # the teacher pass has its own progress bar
            model = model_class(config).from_pretrained(path, **kwargs)
        if self.device_map is None:
            model = model.to(self.device)
        model.eval()
        if student and self.gradient_checkpointing:
            # HF recomputes activations only in training mode; calibration
            # models have no active dropout, so train() changes nothing else.
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:  # transformers >= 5.x
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
            model.train()
        return model

    def autocast(self):
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        enabled = self.dtype != torch.float32
        return torch.autocast(
            device_type=device_type, dtype=self.dtype, enabled=enabled
        )


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' "Loading weights" bar off for one load, then as it was."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
