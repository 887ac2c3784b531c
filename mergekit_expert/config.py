"""The plugin's part of the merge YAML, validated strictly.

mergekit ignores unknown top-level keys and keeps unknown per-model parameters;
for the expert merging methods a misspelled key would silently fall back to a
default, so every key of the plugin's part is checked and an unknown one is an
error naming the nearest valid key.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .coefficients import METHOD_NAMES
from .errors import ExpertMergingError

DEFAULT_EXCLUDE = (
    r"embed",
    r"lm_head",
    r"norm",
    r"\.bias$",
    r"(^|\.)vision_model\.",
    r"(^|\.)visual\.",
    r"(^|\.)vision_tower\.",
)
INIT_GRID = tuple(round(0.1 * i, 1) for i in range(1, 11))
PROX_LR, ADAMW_LR = 0.05, 0.5  # the default lr of each optimizer
# reg_weight: auto's path, the paper's 0.8 down to none
REG_GRID = (0.8, 0.2, 0.05, 0.0)
# samples_per_expert: auto draws up to this many records per expert, all of a
# file's records when it holds fewer (README "Differences from the paper").
AUTO_SAMPLES = 20


class CalibrationConfig(BaseModel):
    """Top-level ``calibration:`` block; defaults follow the paper (README: "Differences from the paper")."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    samples_per_expert: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    # a number of samples_per_expert above a file's records fails unless this
    allow_fewer_samples: bool = False
    epochs: int = Field(5, ge=1)
    patience: int = Field(3, ge=1)
    init: Literal["auto"] | float | list[float] = "auto"
    init_grid: list[float] = Field(
        default_factory=lambda: list(INIT_GRID), min_length=1
    )
    activation: Literal["sigmoid", "identity"] = "sigmoid"
    # auto: chosen from reg_grid on held-out calibration samples (selection.py)
    reg_weight: Literal["auto"] | Annotated[float, Field(ge=0)] = "auto"
    reg_grid: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: list(REG_GRID), min_length=2
    )
    logit_weight: float = Field(1.0, ge=0)
    hidden_weight: float = Field(1.0, ge=0)
    # -1: the last hidden state (the paper: the middle one, n_blocks // 2;
    # README "Differences from the paper").
    hidden_layers: list[int] = Field(default_factory=lambda: [-1])
    temperature: float = Field(1.0, gt=0)
    align: Literal["all", "response"] = "all"
    # prox (default): full-batch proximal gradient with a line search, at most
    # max_steps accepted steps; adamw: the paper's loop (weight_decay,
    # grad_clip, accumulation, schedule, epochs, patience apply to it alone;
    # lr serves both, with its own meaning in each).
    optimizer: Literal["prox", "adamw"] = "prox"
    max_steps: int = Field(40, ge=1)
    alignment_scale: Literal["base", "absolute"] = "absolute"
    # None: 0.05 for prox (the first step's largest alpha move), 0.5 for adamw.
    lr: float | None = Field(None, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    accumulation: int = Field(8, ge=1)
    schedule: Literal["cosine", "cosine_restarts"] = "cosine"
    max_length: int = Field(512, ge=2)
    max_new_tokens: int = Field(64, ge=1)
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    # What the weights ``exclude`` matches hold: task arithmetic at the initial
    # alpha (merged, never trained; the default, README "Differences from the
    # paper"), or the base's values (the paper).
    excluded: Literal["base", "init"] = "init"
    seed: int = 0
    sane_range: tuple[float, float] = (-1.0, 2.0)
    task_vectors: Literal["auto", "resident", "compact", "host", "streamed"] = "auto"
    teacher_top_k: int | None = Field(None, ge=1)
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    gradient_checkpointing: bool = False
    device_map: str | dict[str, str | int] | None = None
    # Expert Merging++ (stage 2); ignored by expert_merging.
    budget: float = Field(1.0, gt=0)
    kappa: float = Field(1.2, ge=0)
    # largest_remainder spends exactly round(budget * L) chunks; floor is the
    # paper's rule (it can spend far less when importance is even).
    allocation: Literal["largest_remainder", "floor"] = "largest_remainder"
    stage2_init: Literal["warm", "init"] = "warm"
    # None: adamw's warm start continues where stage 1's schedule ended
    # (0.1 * lr); a restart at init, or prox, uses lr.
    stage2_lr: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _default_lr(self) -> CalibrationConfig:
        if self.lr is None:
            self.lr = PROX_LR if self.optimizer == "prox" else ADAMW_LR
        return self

    @property
    def step(self) -> float:
        """The learning rate (adamw) or first step size (prox), filled in."""
        assert self.lr is not None  # set by the validator
        return self.lr

    def stage2(self) -> CalibrationConfig:
        """The settings stage 2 trains with."""
        lr = self.stage2_lr
        if lr is None:
            warm = self.stage2_init == "warm" and self.optimizer == "adamw"
            lr = 0.1 * self.step if warm else self.step
        return self.model_copy(update={"lr": lr})

    @field_validator("init")
    @classmethod
    def _init_range(cls, value):
        values = [value] if isinstance(value, float) else value
        if isinstance(values, list) and not values:
            raise ValueError("init list is empty; give one value per expert")
        return value

    @field_validator("sane_range")
    @classmethod
    def _ordered_range(cls, value):
        if value[0] >= value[1]:
            raise ValueError("sane_range must be [low, high] with low < high")
        return value

    @field_validator("exclude")
    @classmethod
    def _exclude_regexes(cls, value):
        import re

        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"invalid regex {pattern!r}: {error}") from None
        return value


class ExpertParameters(BaseModel):
    """Per-model ``parameters:`` of an expert."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    calibration: str | None = None
    task_weight: float = Field(1.0, ge=0)


class SharedParameters(BaseModel):
    """Top-level ``parameters:`` of an expert merging config."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    coefficients: str | None = None


@dataclass(frozen=True)
class Expert:
    reference: ModelReference
    calibration: str | None
    task_weight: float

    @property
    def name(self) -> str:
        return str(self.reference)


@dataclass(frozen=True)
class ExpertMergePlan:
    """Everything the calibration and merge stages need, validated."""

    method: str
    base: ModelReference
    experts: tuple[Expert, ...]
    calibration: CalibrationConfig
    coefficients: str | None
    merge_config: MergeConfiguration

    def init_values(self) -> list[float] | None:
        """Per-expert initial alpha, or None for the automatic search."""
        init = self.calibration.init
        if init == "auto":
            return None
        if isinstance(init, float):
            return [init] * len(self.experts)
        return list(init)


# Names other tools and papers use for our keys.
SYNONYMS = {
    "learning_rate": "lr",
    "learningrate": "lr",
    "gamma": "reg_weight",
    "regularization": "reg_weight",
    "regularizer_weight": "reg_weight",
    "lambda": "reg_weight",
    "num_epochs": "epochs",
    "n_epochs": "epochs",
    "num_samples": "samples_per_expert",
    "samples": "samples_per_expert",
    "n_samples": "samples_per_expert",
    "gradient_accumulation_steps": "accumulation",
    "grad_accum": "accumulation",
    "alpha": "init",
    "init_alpha": "init",
    "beta": "task_weight",
    "data": "calibration",
    "dataset": "calibration",
    "calibration_data": "calibration",
    "max_grad_norm": "grad_clip",
    "clip": "grad_clip",
    "seq_len": "max_length",
    "max_seq_length": "max_length",
    "top_k": "teacher_top_k",
}


def _nearest(key: str, valid: Any) -> str:
    valid = list(valid)
    synonym = SYNONYMS.get(key.lower().replace("-", "_"))
    if synonym in valid:
        return f"; did you mean {synonym!r}?"
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return (
        f"; did you mean {match[0]!r}?" if match else f"; valid keys: {sorted(valid)}"
    )


def _check_keys(where: str, values: Mapping[str, Any], valid: Any) -> None:
    for key in values:
        if key not in valid:
            raise ExpertMergingError(
                f"unknown key {where}{key!r}{_nearest(str(key), valid)}"
            )


Model = TypeVar("Model", bound=BaseModel)


def _validate(model: type[Model], where: str, values: Any) -> Model:
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ExpertMergingError(
            f"{where} must be a mapping, got {type(values).__name__}"
        )
    _check_keys(where + ".", values, model.model_fields)
    try:
        return model.model_validate(dict(values))
    except ValidationError as error:
        problems = "; ".join(
            f"{where}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in error.errors()
        )
        raise ExpertMergingError(f"invalid value: {problems}") from None


def parse_plan(document: Any) -> ExpertMergePlan:
    """Validate an expert merging YAML document; no file or model is touched."""
    if not isinstance(document, Mapping):
        raise ExpertMergingError("the config must be a YAML mapping")
    method = document.get("merge_method")
    if method not in METHOD_NAMES:
        raise ExpertMergingError(
            f"merge_method must be one of {METHOD_NAMES}, got {method!r}"
        )
    top_level = set(MergeConfiguration.model_fields) | {"calibration"}
    _check_keys("", document, top_level)
    for key in ("slices", "modules"):
        if document.get(key):
            raise ExpertMergingError(
                f"{method} merges whole models: use `models:` rather than `{key}:`"
            )
    if not document.get("base_model"):
        raise ExpertMergingError(
            f"{method} needs `base_model:` (the model the experts were fine-tuned "
            "from): task vectors are expert minus base"
        )
    calibration = _validate(
        CalibrationConfig, "calibration", document.get("calibration")
    )
    shared = _validate(SharedParameters, "parameters", document.get("parameters"))
    data = {k: v for k, v in document.items() if k != "calibration"}
    try:
        merge_config = MergeConfiguration.model_validate(data)
    except (ValidationError, RuntimeError) as error:
        raise ExpertMergingError(f"invalid mergekit configuration: {error}") from None
    base = merge_config.base_model
    experts: list[Expert] = []
    seen: set[ModelReference] = set()
    for index, entry in enumerate(merge_config.models or []):
        if entry.model == base:
            continue  # the base carries no task vector
        if entry.model in seen:
            raise ExpertMergingError(
                f"expert {entry.model} is listed twice under models:"
            )
        seen.add(entry.model)
        where = f"models[{index}].parameters"
        raw = entry.parameters or {}
        if "weight" in raw:
            raise ExpertMergingError(
                f"{where}.weight: {method} learns the weights; remove `weight`, or use "
                "merge_method: task_arithmetic for fixed coefficients"
            )
        params = _validate(ExpertParameters, where, raw)
        if shared.coefficients is None and not params.calibration:
            raise ExpertMergingError(
                f"expert {entry.model} has no calibration data: add "
                f"`parameters: {{calibration: PATH}}` under models[{index}] "
                "(a JSONL/JSON/text/parquet file or a datasets directory)"
            )
        experts.append(Expert(entry.model, params.calibration, params.task_weight))
    if not experts:
        raise ExpertMergingError(
            f"{method} needs at least one expert besides the base model"
        )
    init = calibration.init
    if isinstance(init, list) and len(init) != len(experts):
        raise ExpertMergingError(
            f"calibration.init has {len(init)} values for {len(experts)} experts; "
            "give one per expert in YAML order, a single number, or auto"
        )
    return ExpertMergePlan(
        method=method,
        base=base,
        experts=tuple(experts),
        calibration=calibration,
        coefficients=shared.coefficients,
        merge_config=merge_config,
    )
