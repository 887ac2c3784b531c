"""Both a wheel and a PEP 660 editable wheel put the autoload .pth in site-packages.

A file at the root of a wheel is installed into site-packages, where Python
runs .pth files at start-up; so checking both wheels' roots (and RECORD, which
pip uses to uninstall) checks both kinds of install. Built with setuptools'
own PEP 517 backend from a copy of the project, no network.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from mergekit_expert.testing.cli import PTH, REPO

setuptools = pytest.importorskip("setuptools", minversion="68")

KINDS = ("wheel", "editable", "strict")  # strict: editable_mode=strict (link tree)
WIRING = """
[tool.setuptools]
py-modules = ["mergekit_expert_autoload"]

[tool.setuptools.cmdclass]
build_py = "build_autoload.BuildPy"
editable_wheel = "build_autoload.EditableWheel"
"""


def wired(pyproject: str) -> str:
    """pyproject.toml with the autoload wiring (REPORT.md), if it lacks it."""
    if "build_autoload" in pyproject:
        return pyproject
    marker = "[tool.setuptools.packages.find]"
    assert marker in pyproject
    return pyproject.replace(marker, WIRING.strip() + "\n\n" + marker)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    root = tmp_path_factory.mktemp("packaging")
    project = root / "project"
    shutil.copytree(
        REPO / "mergekit_expert",
        project / "mergekit_expert",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for name in ("README.md", "build_autoload.py", PTH, "mergekit_expert_autoload.py"):
        shutil.copy(REPO / name, project / name)
    (project / "pyproject.toml").write_text(
        wired((REPO / "pyproject.toml").read_text())
    )
    script = (
        "import sys; from setuptools import build_meta as backend; "
        "wheel, editable, strict, names = sys.argv[1:5]; "  # the backend rewrites sys.argv
        "built = [backend.build_wheel(wheel), backend.build_editable(editable), "
        "backend.build_editable(strict, {'editable_mode': 'strict'})]; "
        "open(names, 'w').write(' '.join(built))"
    )
    for kind in KINDS:
        (root / kind).mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            *(str(root / kind) for kind in KINDS),
            str(root / "names"),
        ],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    built = (root / "names").read_text().split()
    return {kind: root / kind / name for kind, name in zip(KINDS, built)}


def record(archive: zipfile.ZipFile) -> dict[str, tuple[str, str]]:
    [name] = [n for n in archive.namelist() if n.endswith(".dist-info/RECORD")]
    rows = archive.read(name).decode().splitlines()
    return {row.split(",")[0]: tuple(row.split(",")[1:]) for row in rows if row}


@pytest.mark.parametrize("kind", KINDS)
def test_pth_at_wheel_root_and_in_record(wheels, kind):
    with zipfile.ZipFile(wheels[kind]) as archive:
        data = archive.read(PTH)  # KeyError if absent from the root
        assert data == (REPO / PTH).read_bytes()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        assert record(archive)[PTH] == (f"sha256={digest.decode()}", str(len(data)))
        assert archive.testzip() is None
        names = archive.namelist()
    if kind == "wheel":
        assert "mergekit_expert_autoload.py" in names
        assert "build_autoload.py" not in names
    else:
        assert any(n.startswith("__editable__.") and n.endswith(".pth") for n in names)
        # .pth files run in name order: setuptools' editable finder is in place
        # before ours imports mergekit_expert_autoload through it
        assert sorted(n for n in names if n.endswith(".pth"))[-1] == PTH


def test_pth_line_only_arms_the_hook():
    line = (REPO / PTH).read_text()
    assert line.startswith("import ") and line.count("\n") == 1
    source = (REPO / "mergekit_expert_autoload.py").read_text()
    imports = {
        ln.split()[1].split(".")[0]
        for ln in source.splitlines()
        if ln.startswith(("import ", "from "))
    }
    assert imports <= {"os", "sys"}, imports
