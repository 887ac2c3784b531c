"""``mergekit-expert CONFIG OUT``: mergekit-yaml plus calibration for expert merging."""

from __future__ import annotations

import os

import click
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

from . import register
from .errors import ExpertMergingError
from .methods import METHOD_NAMES


@click.command("mergekit-expert", cls=PrettyPrintHelp)
@click.argument("config_file")
@click.argument("out_path")
@click.option(
    "--coefficients",
    type=str,
    default=None,
    help="Merge from this coefficients.safetensors artifact instead of calibrating.",
)
@click.option(
    "--allow-pickle",
    is_flag=True,
    default=False,
    help="Accept pickle-only (.bin) checkpoints; unpickling can run code.",
)
@add_merge_options
def main(
    merge_options: MergeOptions,
    config_file: str,
    out_path: str,
    coefficients: str | None,
    allow_pickle: bool,
):
    """Merge the models of CONFIG_FILE into OUT_PATH.

    For expert_merging / expert_merging_pp the coefficients are calibrated first
    (or read from --coefficients); any other merge method runs exactly as
    mergekit-yaml runs it.
    """
    register()
    merge_options.apply_global_options()
    if not os.path.isfile(config_file):
        raise click.ClickException(f"config file {config_file!r} does not exist")
    with open(config_file, encoding="utf-8") as handle:
        config_source = handle.read()
    try:
        document = yaml.safe_load(config_source)
    except yaml.YAMLError as error:
        raise click.ClickException(f"{config_file}: invalid YAML: {error}") from None
    method = document.get("merge_method") if isinstance(document, dict) else None
    if method not in METHOD_NAMES:
        if coefficients is not None:
            raise click.ClickException(
                f"--coefficients applies to {' / '.join(METHOD_NAMES)}, not {method!r}"
            )
        merge_config = MergeConfiguration.model_validate(document)
        run_merge(
            merge_config, out_path, options=merge_options, config_source=config_source
        )
        return
    from .pipeline import run_expert_merge

    try:
        run_expert_merge(
            document,
            out_path,
            merge_options,
            config_source=config_source,
            coefficients=coefficients,
            allow_pickle=allow_pickle,
        )
    except ExpertMergingError as error:
        raise click.ClickException(f"{config_file}: {error}") from None


if __name__ == "__main__":
    main()
