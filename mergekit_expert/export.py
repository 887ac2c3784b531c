"""Export a stage-1 coefficients artifact as a stock mergekit ``task_arithmetic`` config.

``task_arithmetic`` computes ``base + lambda * sum_k w_k (expert_k - base)``
(``normalize`` off, its default, and ``lambda`` 1), i.e. exactly the expert
merging kernel when every weight has one coefficient per expert (m = 1). Its
``weight`` is resolved per tensor from conditional filters, which mergekit
matches as *substrings* of the tensor name, first match wins
(``mergekit.config.evaluate_setting``). So each expert gets one filter per
tensor name, longest name first: a filter can only match a name that contains
it, and every name containing another is longer, so a tensor always reaches
its own filter before any shorter one it contains. A tensor of the base that
the artifact does not list keeps the base (weight 0): it gets an explicit 0
when it contains a listed name, else it falls through to a final catch-all 0.
Before anything is written, every tensor name of the base is resolved with
mergekit's own parameter resolver and compared with the value it must get.

Chunk-wise coefficients (m > 1, Expert Merging++ stage 2) have no equivalent
in a per-tensor scalar weight: they are refused, unless all of a weight's
chunks carry the same value.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import click
import torch
import yaml

from .coefficients import CoefficientArtifact
from .errors import ExpertMergingError

LOG = logging.getLogger(__name__)

METHOD = "task_arithmetic"
HALF_DTYPES = ("bfloat16", "float16")


def stage1_coefficients(artifact: CoefficientArtifact) -> dict[str, list[float]]:
    """One float per expert for each weight; refuses chunk-wise coefficients.
    (``CoefficientArtifact.load`` has already refused non-finite values.)"""
    values: dict[str, list[float]] = {}
    chunked = []
    for name, matrix in artifact.coefficients.items():
        matrix = matrix.to(torch.float32)
        if matrix.shape[1] > 1 and not torch.equal(
            matrix, matrix[:, :1].expand_as(matrix)
        ):
            chunked.append(f"{name} (m={matrix.shape[1]})")
            continue
        values[name] = [float(x) for x in matrix[:, 0]]
    if chunked:
        shown = ", ".join(chunked[:5]) + (", ..." if len(chunked) > 5 else "")
        raise ExpertMergingError(
            f"{len(chunked)} weight(s) have chunk-wise coefficients, which "
            f"{METHOD} cannot express (its weight is one number per tensor and "
            f"expert): {shown}. Only a stage-1 artifact (m = 1 for every weight, "
            "e.g. expert_merging, or expert_merging_pp with budget 1) exports; "
            "merge this one with `mergekit-expert --coefficients ARTIFACT` or "
            "mergekit-yaml with mergekit-expert installed"
        )
    return values


def base_tensor_names(base: str) -> list[str] | None:
    """Tensor names of a local base model; None when it is not on this disk."""
    from mergekit.common import ModelReference
    from mergekit.io import ShardedTensorIndex

    path = ModelReference.model_validate(base).model.path
    if not os.path.isdir(path):
        return None
    try:
        return sorted(ShardedTensorIndex.from_disk(path).tensor_paths)
    except Exception as error:  # mergekit raises several types for bad folders
        raise ExpertMergingError(
            f"cannot list the tensors of base model {base!r}: {error}"
        ) from error


def weight_filters(
    values: Mapping[str, float], names: Iterable[str]
) -> list[dict[str, Any]]:
    """Conditional ``weight`` settings giving each of ``names`` its own value.

    ``values`` maps listed tensors to their weight; any other of ``names`` must
    resolve to 0. Longest filter first; a name that contains a listed name gets
    an explicit 0; one catch-all 0 last.
    """
    entries = dict(values)
    listed = list(values)
    for name in names:
        if name not in entries and any(other in name for other in listed):
            entries[name] = 0.0
    ordered = sorted(entries, key=lambda name: (-len(name), name))
    return [{"filter": name, "value": entries[name]} for name in ordered] + [
        {"value": 0.0}
    ]


def export_config(
    artifact_path: str,
    *,
    base: str | None = None,
    experts: Sequence[str] | Mapping[str, str] | None = None,
    dtype: str | None = None,
    tensor_names: Iterable[str] | None = None,
) -> dict[str, Any]:
    """A ``task_arithmetic`` config reproducing a stage-1 artifact's merge.

    ``base`` / ``experts`` override the model references stored in the artifact
    (``experts``: K references in the artifact's order, or a mapping from
    stored reference to new one). ``dtype``: of the merged model; a 16-bit one
    becomes ``dtype: float32`` + ``out_dtype``, so the arithmetic is float32 as
    in the plugin's kernel. ``tensor_names``: the names to check the
    filters against; by default the base model's, read from its files, plus the
    artifact's own.
    """
    artifact = CoefficientArtifact.load(artifact_path)
    k = len(artifact.experts)
    base_ref = base if base is not None else artifact.base
    expert_refs = _expert_references(artifact, experts)
    values = stage1_coefficients(artifact)

    if tensor_names is None:
        tensor_names = base_tensor_names(base_ref)
        if tensor_names is None:
            LOG.warning(
                "base model %r is not a local folder: the filters are checked "
                "against the artifact's weights only",
                base_ref,
            )
    names = sorted(set(tensor_names or ()) | set(values))
    if tensor_names is not None:
        unknown = sorted(set(values) - set(tensor_names))
        if unknown:
            raise ExpertMergingError(
                f"the artifact has coefficients for {len(unknown)} weight(s) the "
                f"base model {base_ref!r} does not have (e.g. {unknown[0]!r}); "
                "is this the base it was calibrated on?"
            )

    models = [
        {
            "model": reference,
            "parameters": {
                "weight": weight_filters(
                    {name: row[index] for name, row in values.items()}, names
                )
            },
        }
        for index, reference in enumerate(expert_refs)
    ]
    document: dict[str, Any] = {
        "merge_method": METHOD,
        "base_model": base_ref,
        "parameters": {"normalize": False, "lambda": 1.0},
        "models": models,
    }
    if dtype in HALF_DTYPES:
        # task_arithmetic does its arithmetic in `dtype`; the plugin's kernel in
        # float32, rounding once at the end: float32 math, `out_dtype` output
        document["dtype"] = "float32"
        document["out_dtype"] = dtype
    elif dtype is not None:
        document["dtype"] = dtype
    # check what will be written: the YAML text read back, as mergekit reads it
    check_config(yaml.safe_load(to_yaml(document)), values, names, k)
    return document


def _expert_references(
    artifact: CoefficientArtifact, experts: Sequence[str] | Mapping[str, str] | None
) -> list[str]:
    stored = list(artifact.experts)
    if experts is None:
        return stored
    if isinstance(experts, Mapping):
        unknown = sorted(set(experts) - set(stored))
        if unknown:
            raise ExpertMergingError(
                f"expert override(s) for {unknown}, which the artifact does not "
                f"list; it lists {stored}"
            )
        return [experts.get(ref, ref) for ref in stored]
    experts = list(experts)
    if len(experts) != len(stored):
        raise ExpertMergingError(
            f"{len(experts)} expert reference(s) given for an artifact calibrated "
            f"with {len(stored)} experts ({stored}), in that order"
        )
    return experts


def check_config(
    document: Mapping[str, Any],
    values: Mapping[str, Sequence[float]],
    names: Iterable[str],
    k: int,
) -> None:
    """Resolve every tensor's parameters as mergekit's planner does; compare."""
    from mergekit import merge_methods
    from mergekit.config import MergeConfiguration
    from mergekit.parameter_resolver import resolve_parameters

    config = MergeConfiguration.model_validate(document)
    spec = merge_methods.get(METHOD).spec
    settings = {model.model: model.parameters for model in config.models}

    def sources(model):
        # as ConfigReader.parameter_sources for a models: merge (one slice)
        return ([settings[model]] if model is not None else []) + [config.parameters]

    references = [model.model for model in config.models]
    for name in names:
        shared, per_input = resolve_parameters(
            spec,
            tensor_name=name,
            inputs={reference: name for reference in references},
            sources=sources,
            base_model=config.base_model,
        )
        if shared["normalize"] or shared["lambda"] != 1.0:
            raise AssertionError(f"{name}: normalize/lambda resolve to {shared}")
        for index, reference in enumerate(references):
            got = per_input[reference]["weight"]
            want = values[name][index] if name in values else 0.0
            if got != want:  # exact: YAML floats round-trip the float32 values
                raise AssertionError(
                    f"exported filters resolve weight {got} for expert {index} "
                    f"on {name}, expected {want}"
                )
    if len(references) != k:
        raise AssertionError(f"{len(references)} models for {k} experts")


HEADER = "# Exported by `mergekit-expert export`"


def to_yaml(document: Mapping[str, Any], source: str | None = None) -> str:
    header = (
        HEADER
        + (f" from {source}" if source else "")
        + ".\n# A stock mergekit task_arithmetic config: run it with mergekit-yaml;"
        " no plugin needed.\n"
    )
    return header + yaml.safe_dump(dict(document), sort_keys=False, width=1000)


def write_config(document: Mapping[str, Any], path: str, source: str | None = None):
    """Write the YAML to ``path``, replacing only a file an export wrote
    (never the artifact or another file of the user's), all or nothing."""
    if os.path.lexists(path) and not _exported(path):
        raise ExpertMergingError(
            f"{path} already exists and was not written by mergekit-expert export; "
            "choose a new output path (or remove the file yourself)"
        )
    # A temporary file of our own next to PATH (created exclusively, so never a
    # file or link that was there), renamed over PATH when complete.
    folder, name = os.path.split(os.path.abspath(path))
    partial = None
    try:
        fd, partial = tempfile.mkstemp(
            prefix=f".{name}.", suffix=".partial", dir=folder
        )
        umask = os.umask(0)
        os.umask(umask)
        try:  # mkstemp's 0600 is not what a config needs
            os.fchmod(fd, 0o666 & ~umask)
        except (OSError, AttributeError):  # fixed by the mount, or no fchmod
            pass
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(to_yaml(document, source))
        os.replace(partial, path)
    except OSError as error:
        if partial is not None and os.path.lexists(partial):
            os.remove(partial)
        raise ExpertMergingError(f"cannot write {path}: {error.strerror}") from None


def _exported(path: str) -> bool:
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.readline().startswith(HEADER)


@click.command("mergekit-expert export")
@click.argument("artifact", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the YAML here (default: standard output).",
)
@click.option(
    "--base", default=None, help="Base model reference (overrides the artifact's)."
)
@click.option(
    "--expert",
    "experts",
    multiple=True,
    help="Expert reference, once per expert in the artifact's order "
    "(overrides the artifact's).",
)
@click.option(
    "--dtype", default=None, help="dtype of the exported config, e.g. bfloat16."
)
def main(artifact, output, base, experts, dtype):
    """Write a stock task_arithmetic config equivalent to a stage-1 ARTIFACT."""
    try:
        document = export_config(
            artifact, base=base, experts=list(experts) or None, dtype=dtype
        )
    except (ExpertMergingError, ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from None
    if output is None:
        click.echo(to_yaml(document, artifact), nl=False)
        return
    try:
        write_config(document, output, artifact)
    except ExpertMergingError as error:
        raise click.ClickException(str(error)) from None
