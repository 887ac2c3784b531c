"""The two jobs the CLI runs: an expert merge, or any other mergekit method.

Order of work: validate everything that can be validated without loading a
model (:mod:`preflight`: config, models, data, an existing artifact, and
where the run may write, :mod:`output`); calibrate (:mod:`calibrate`) unless
merging from an artifact; ``mergekit.merge.run_merge`` with the artifact;
then the report (:mod:`report`). Nothing is written to OUT before the merge is
complete: it is staged in ``OUT.partial`` and moved into place at the end.
"""

from __future__ import annotations

import copy
import logging
import os

from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from pydantic import ValidationError

from .calibrate import calibrate, local_models
from .card import reproduce_config
from .coefficients import ARTIFACT_NAME
from .compat import fix_model_card_offline
from .config import parse_plan
from .distributed import barrier, is_main, leave
from .distributed import setup as setup_distributed
from .errors import ExpertMergingError
from .memory import StageClock
from .output import InputPath, WorkDir, check_output_location, check_replaceable
from .preflight import check_device, preflight
from .report import (
    build_report,
    save_calibration_config,
    summary_line,
    write_outputs,
)
from .sources import model_inputs, option_inputs, resolve_models, tokenizer_inputs
from .state import CHECKPOINT, fingerprint

LOG = logging.getLogger(__name__)


def run_expert_merge(
    document: dict,
    out_path: str,
    options: MergeOptions,
    *,
    config_source: str | None = None,
    config_file: str | None = None,
    coefficients: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> str | None:
    """The whole job: validate, calibrate (unless given coefficients), merge, report.

    Returns the run's one-line summary (None on ranks other than 0).

    The output is staged in ``OUT.partial`` and moved into place when complete;
    a calibration that fails or is interrupted keeps its checkpoint there, and
    running the same command again resumes from it.
    """
    plan = parse_plan(document)
    checked = preflight(plan, options, coefficients, allow_pickle, config_file)
    check_output_location(out_path, checked.inputs)
    check_replaceable(out_path, overwrite)
    references = [plan.base] + [e.reference for e in plan.experts]
    model_paths = sorted(
        {
            p
            for r in references
            for p in (r.model.path, r.lora.path if r.lora else None)
            if p and os.path.exists(p)
        }
    )
    data_paths = [e.calibration for e in plan.experts if e.calibration]
    if checked.artifact is not None:
        data_paths = []
    work = WorkDir(out_path, fingerprint(document, model_paths, data_paths), overwrite)
    # Join torchrun's process group first: only then does is_main() know the rank.
    options = options.model_copy(
        update={"device": setup_distributed(options.device or "cpu")}
    )
    if is_main():
        work.open()  # rank 0 alone prepares and locks OUT.partial ...
    barrier()  # ... and the other ranks find it ready
    lora_cache = options.lora_merge_cache or work.file("lora")
    merge_options = options.model_copy(update={"lora_merge_cache": lora_cache})
    try:
        calibration = None
        if checked.artifact is not None and checked.artifact_path is not None:
            # Adapters merged (or a merge cut short redone) as calibration
            # would; run_merge then reuses them.
            local_models(plan, merge_options, lora_cache, work)
            if not is_main():
                return None  # rank 0 writes the model and the report
            artifact_file = checked.artifact_path
            artifact = checked.artifact
        else:
            calibration = calibrate(plan, checked, merge_options, lora_cache, work)
            if not is_main():
                return None  # rank 0 writes the artifact, the model and the report
            artifact = calibration.artifact
            artifact_file = work.file(ARTIFACT_NAME)
            artifact.save(artifact_file)
        merge_config = copy.deepcopy(plan.merge_config)
        merge_config.parameters = {"coefficients": os.path.abspath(artifact_file)}
        clock = StageClock()
        fix_model_card_offline()
        with clock.stage("write"):
            run_merge(
                merge_config,
                work.staging,
                options=merge_options,
                config_source=reproduce_config(document),
            )
        report = build_report(artifact, calibration, artifact_file, clock.stages)
        write_outputs(
            work.staging, artifact, artifact_file, report, options.write_model_card
        )
        if calibration is not None and config_source is not None:
            save_calibration_config(work.staging, config_source)
        work.record_output()
        work.publish()
        return summary_line(out_path, report)
    except BaseException:
        if is_main():
            _after_failure(work, keep_state=checked.artifact is None)
        raise
    finally:
        work.close()
        leave()


def _after_failure(work: WorkDir, keep_state: bool) -> None:
    """Drop the half-written output; keep a calibration state to resume from."""
    work.discard_staging()
    if not keep_state or not os.path.exists(work.file(CHECKPOINT)):
        work.remove()
        return
    LOG.error(
        "the calibration state is kept in %s: run the same command again to resume; "
        "%s was not changed",
        work.path,
        work.out_path,
    )


def run_plain_merge(
    document: dict,
    out_path: str,
    options: MergeOptions,
    *,
    config_source: str,
    config_file: str,
    overwrite: bool = False,
) -> None:
    """Any other mergekit method, under the same output rules as expert merging:
    validated inputs, a locked ``OUT.partial``, an atomic replace at the end."""
    try:
        merge_config = MergeConfiguration.model_validate(document)
    except (ValidationError, ValueError, RuntimeError) as error:
        raise ExpertMergingError(f"invalid mergekit configuration: {error}") from None
    check_device(options.device)
    named = [(r, f"model {r}") for r in merge_config.referenced_models()]
    inputs = model_inputs(resolve_models(named, allow_pickle=None))
    inputs += option_inputs(options) + tokenizer_inputs(merge_config)
    inputs.append(InputPath(config_file, "the config file"))
    check_output_location(out_path, inputs)
    check_replaceable(out_path, overwrite)
    work = WorkDir(out_path, f"mergekit:{merge_config.merge_method}", overwrite)
    work.open()
    try:
        fix_model_card_offline()
        run_merge(
            merge_config, work.staging, options=options, config_source=config_source
        )
        work.publish()  # exactly mergekit-yaml's output: no record of ours
    except BaseException:
        work.remove()
        raise
    finally:
        work.close()
