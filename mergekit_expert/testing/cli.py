"""Write a merge YAML, run ``mergekit-expert`` on it, read what the run wrote.

In process (click's runner: fast, the exception visible) or as a real
subprocess (for what only a process can show: SIGKILL, exit codes, stderr,
resource limits, the lock held by another process). A run's working state
lives in ``OUT.partial/``; :func:`checkpoint_state` reads the calibration
checkpoint there the way a second process sees it.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ARTIFACT = os.path.join("expert_merging", "coefficients.safetensors")
REPORT = os.path.join("expert_merging", "report.json")


def write_config(path, document: dict | str) -> str:
    """``document`` as YAML (a string is written as is); returns the path."""
    text = document if isinstance(document, str) else yaml.safe_dump(document)
    Path(path).write_text(text, encoding="utf-8")
    return os.fspath(path)


def invoke(*args, quiet: bool = True, catch_exceptions: bool = True):
    """``mergekit-expert ARGS [--quiet]`` in this process; click's ``Result``."""
    from click.testing import CliRunner

    from mergekit_expert.cli import main

    extra = ["--quiet"] if quiet else []
    return CliRunner().invoke(
        main, [os.fspath(a) for a in args] + extra, catch_exceptions=catch_exceptions
    )


def read_report(out) -> dict:
    with open(os.path.join(out, REPORT), encoding="utf-8") as handle:
        return json.load(handle)


def read_coefficients(out) -> dict:
    """The coefficients artifact of a finished run, tensor by weight name."""
    from safetensors.torch import load_file

    return load_file(os.path.join(out, ARTIFACT))


def read_model(out) -> dict:
    """Every tensor of the merged model written to ``out``."""
    from .oracles import load_tensors

    return load_tensors(os.fspath(out))


@dataclass
class Run:
    """A finished, successful run: its config, OUT and console output."""

    config: str
    out: Path
    output: str

    @property
    def report(self) -> dict:
        return read_report(self.out)

    @property
    def coefficients(self) -> dict:
        return read_coefficients(self.out)

    @property
    def model(self) -> dict:
        return read_model(self.out)


def run_document(folder, document: dict, *extra, name: str = "merge", out=None) -> Run:
    """Write ``folder/NAME.yml``, run it into ``out`` (default ``folder/NAME``)
    in this process, and fail with the run's output unless it succeeded."""
    folder = Path(folder)
    config = write_config(folder / f"{name}.yml", document)
    out = Path(out) if out is not None else folder / name
    result = invoke(config, out, *extra, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return Run(config, out, result.output)


def run_failing(folder, document: dict | str, *extra) -> str:
    """Run a config that must be refused: non-zero exit, our own error (no
    traceback), no OUT left behind. Returns the output (the message)."""
    folder = Path(folder)
    config = write_config(folder / "merge.yml", document)
    out = folder / "out"
    result = invoke(config, out, *extra)
    assert result.exit_code != 0
    assert not out.exists(), "a failed run must not leave an output directory"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        result.exception
    )
    return result.output


# --- as a subprocess ---------------------------------------------------------


def cli_command() -> list[str]:
    """``python -m mergekit_expert`` with this interpreter."""
    return [sys.executable, "-m", "mergekit_expert"]


def hub_offline_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with the hub offline (fixtures never use the network)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", **(extra or {})}


def run_process(args, env: dict[str, str] | None = None, timeout: float = 120, **kw):
    """``mergekit-expert ARGS --quiet`` as a subprocess, output captured as text."""
    return subprocess.run(
        [*cli_command(), *map(os.fspath, args), "--quiet"],
        capture_output=True,
        text=True,
        env=hub_offline_env(env),
        timeout=timeout,
        **kw,
    )


def start_process(args, **popen_kwargs) -> subprocess.Popen:
    """``mergekit-expert ARGS --quiet`` started in the background; output
    discarded unless ``popen_kwargs`` say otherwise."""
    popen_kwargs.setdefault("stdout", subprocess.DEVNULL)
    popen_kwargs.setdefault("stderr", subprocess.DEVNULL)
    popen_kwargs.setdefault("env", hub_offline_env())
    return subprocess.Popen(
        [*cli_command(), *map(os.fspath, args), "--quiet"], **popen_kwargs
    )


def checkpoint_state(out) -> dict | None:
    """The JSON state of OUT's calibration checkpoint, None while there is none."""
    from safetensors import safe_open

    path = f"{os.fspath(out)}.partial/checkpoint.safetensors"
    try:
        with safe_open(path, "pt") as handle:
            return json.loads(handle.metadata()["state"])
    except Exception:  # absent, or being replaced this instant
        return None


def reached(phase: str, steps: int):
    """A checkpoint condition: ``phase`` has taken at least ``steps`` optimizer steps."""

    def condition(state: dict) -> bool:
        loop = state.get("loop")  # None until a stage's loop has saved itself
        return (
            loop is not None
            and loop["phase"] == phase
            and loop["state"]["history"]["steps"] >= steps
        )

    condition.__doc__ = f"{phase} step {steps}"
    return condition


def wait_for_checkpoint(
    process: subprocess.Popen, out, until=None, timeout: float = 240.0
) -> dict:
    """Poll OUT's checkpoint until ``until(state)`` holds (default: any state).

    Fails if the process ends first or the timeout passes; the state.
    """
    what = (until.__doc__ if until else None) or "a checkpoint"
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = checkpoint_state(out)
        if state is not None and (until is None or until(state)):
            return state
        if process.poll() is not None:
            raise AssertionError(
                f"the run ended (rc={process.returncode}) before reaching {what}"
            )
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def kill_at(config, out, until, timeout: float = 240.0) -> dict:
    """Start a run and SIGKILL it once its checkpoint satisfies ``until``."""
    process = start_process([config, out])
    try:
        state = wait_for_checkpoint(process, out, until, timeout)
        process.kill()  # SIGKILL: no handler, no cleanup
        process.wait()
        return state
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# --- the host's own entry points (mergekit-yaml, run_merge) in a fresh process --

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PTH = "mergekit_expert_autoload.pth"


def installed_pth() -> str | None:
    """The autoload .pth in this interpreter's site-packages, if installed."""
    for directory in [*site.getsitepackages(), site.getusersitepackages()]:
        if os.path.isfile(os.path.join(directory, PTH)):
            return os.path.join(directory, PTH)
    return None


def host_env(tmp_dir: Path, autoload: bool = True, **extra: str) -> dict[str, str]:
    """Environment for a host entry point run in a subprocess.

    This checkout comes first on PYTHONPATH. When the package is installed with
    its .pth (after integration), start-up runs it as it would for a user;
    otherwise a ``sitecustomize`` adds a site directory holding a copy of the
    .pth, so the very same line still runs through ``site``'s .pth processing.
    """
    env = dict(os.environ)
    env.pop("PYTHONSTARTUP", None)
    paths = [str(REPO)]
    if installed_pth() is None:
        site_dir = tmp_dir / "autoload_site"
        custom_dir = tmp_dir / "autoload_custom"
        site_dir.mkdir(exist_ok=True)
        custom_dir.mkdir(exist_ok=True)
        (site_dir / PTH).write_text((REPO / PTH).read_text())
        (custom_dir / "sitecustomize.py").write_text(
            f"import site\nsite.addsitedir({str(site_dir)!r})\n"
        )
        paths.insert(0, str(custom_dir))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["MERGEKIT_EXPERT_AUTOLOAD"] = "1" if autoload else "0"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.update(extra)
    return env


def run_host(
    args: list[str], env: dict[str, str], cwd=None
) -> subprocess.CompletedProcess:
    """A host command in a subprocess, its output captured."""
    return subprocess.run(
        args, env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )
