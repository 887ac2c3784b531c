"""``mergekit-expert CONFIG OUT``: mergekit-yaml plus calibration for expert merging."""

from __future__ import annotations

import difflib
import os
import stat

import click
import yaml
from mergekit import merge_methods
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options
from safetensors import SafetensorError

from . import register
from .coefficients import METHOD_NAMES
from .errors import ExpertMergingError
from .output import os_error


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
@click.option(
    "--overwrite",
    is_flag=True,
    default=False,
    help="Replace an existing OUT that is not an expert merge this tool wrote "
    "there (any other folder, a copied or downloaded merge, a ties or other "
    "mergekit method's output).",
)
@add_merge_options
def main(
    merge_options: MergeOptions,
    config_file: str,
    out_path: str,
    coefficients: str | None,
    allow_pickle: bool,
    overwrite: bool,
):
    """Merge the models of CONFIG_FILE into OUT_PATH.

    For expert_merging / expert_merging_pp the coefficients are calibrated first
    (or read from --coefficients); any other merge method runs as mergekit-yaml
    runs it. Either way OUT is written only when the merge is complete, and
    never where it could destroy an input or files a merge did not write.
    """
    register()
    merge_options.apply_global_options()
    try:
        document, config_source = read_config(config_file)
        method = document["merge_method"]
        if method not in METHOD_NAMES and coefficients is not None:
            raise ExpertMergingError(
                f"--coefficients applies to {' / '.join(METHOD_NAMES)}, not {method!r}"
            )
        from .pipeline import run_expert_merge, run_plain_merge

        if method in METHOD_NAMES:
            summary = run_expert_merge(
                document,
                out_path,
                merge_options,
                config_source=config_source,
                config_file=config_file,
                coefficients=coefficients,
                allow_pickle=allow_pickle,
                overwrite=overwrite,
            )
            if summary:
                click.echo(summary, err=True)
        else:
            run_plain_merge(
                document,
                out_path,
                merge_options,
                config_source=config_source,
                config_file=config_file,
                overwrite=overwrite,
            )
    except ExpertMergingError as error:
        raise click.ClickException(f"{config_file}: {error}") from None
    except OSError as error:
        raise click.ClickException(str(os_error(error, "the merge failed"))) from None
    except SafetensorError as error:
        raise click.ClickException(
            f"the merge failed writing a safetensors file ({error}); check free disk "
            "space and that OUT's parent is writable, then run the same command again"
        ) from None


def read_config(config_file: str) -> tuple[dict, str]:
    """The YAML document (a mapping with a known merge_method) and its text."""
    try:
        mode = os.stat(config_file).st_mode
    except OSError:
        raise ExpertMergingError("the config file does not exist") from None
    if not stat.S_ISREG(mode):
        raise ExpertMergingError("the config file is not a regular file")
    with open(config_file, encoding="utf-8") as handle:
        try:
            source = handle.read()
        except UnicodeDecodeError as error:
            raise ExpertMergingError(
                f"not UTF-8 text (byte {error.start}); save the config as UTF-8"
            ) from None
    try:
        document = yaml.safe_load(source)
    except yaml.YAMLError as error:
        raise ExpertMergingError(f"invalid YAML: {error}") from None
    except RecursionError:
        raise ExpertMergingError("invalid YAML: nested too deeply") from None
    if document is None:
        raise ExpertMergingError(
            "the config is empty; write a merge config with at least `merge_method:` "
            "and `models:`"
        )
    if not isinstance(document, dict):
        raise ExpertMergingError(
            f"the config must be a YAML mapping (key: value), not a "
            f"{type(document).__name__}"
        )
    method = document.get("merge_method")
    known = sorted(m.spec.name for m in merge_methods.registered_methods())
    if method not in known:
        match = difflib.get_close_matches(str(method), known, n=1, cutoff=0.6)
        hint = f"did you mean {match[0]!r}?" if match else f"known: {', '.join(known)}"
        raise ExpertMergingError(f"unknown merge_method {method!r}; {hint}")
    return document, source


if __name__ == "__main__":
    main()
