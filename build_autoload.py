"""setuptools commands that ship ``mergekit_expert_autoload.pth`` into site-packages.

Build-time only (named from ``[tool.setuptools.cmdclass]`` in pyproject.toml;
not installed). A file at the root of a wheel is installed into site-packages,
and site-packages is where Python runs ``.pth`` files at start-up, so:

- a normal wheel (``pip install .``, ``python -m build``): ``BuildPy`` copies the
  .pth into ``build_lib``, whose root becomes the wheel's root;
- an editable install (``pip install -e .``, PEP 660): setuptools builds an
  "editable wheel" whose only files are its own ``__editable__`` .pth and finder
  (build_lib is not packed, whatever the mode), so ``EditableWheel`` adds ours
  to the root of that wheel, with its RECORD line, after setuptools built it.

pip records the file in RECORD either way, so ``pip uninstall`` removes it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path

from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "mergekit_expert_autoload.pth"
HERE = Path(__file__).resolve().parent


class BuildPy(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_file(str(HERE / PTH), os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=True):
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            outputs.append(os.path.join(self.build_lib, PTH))
        return outputs


class EditableWheel(editable_wheel):
    def run(self):
        before = {path: path.stat().st_mtime_ns for path in _wheels(self.dist_dir)}
        super().run()
        built = [
            path
            for path in _wheels(self.dist_dir)
            if before.get(path) != path.stat().st_mtime_ns
        ]
        if len(built) != 1:
            raise RuntimeError(
                f"expected setuptools to build one editable wheel in {self.dist_dir}, "
                f"found {[p.name for p in built]}: cannot add {PTH}"
            )
        add_to_wheel(built[0], PTH, (HERE / PTH).read_bytes())


def _wheels(directory) -> list[Path]:
    return sorted(Path(directory).glob("*.whl")) if directory else []


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def add_to_wheel(wheel: Path, name: str, data: bytes) -> None:
    """Rewrite ``wheel`` with ``name`` at its root and a RECORD line for it."""
    temporary = wheel.with_suffix(".tmp")
    with (
        zipfile.ZipFile(wheel) as source,
        zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as target,
    ):
        records = [
            i for i in source.infolist() if i.filename.endswith(".dist-info/RECORD")
        ]
        if len(records) != 1:
            raise RuntimeError(f"{wheel.name} has {len(records)} RECORD files")
        for info in source.infolist():
            if info.filename in (name, records[0].filename):
                continue
            target.writestr(info, source.read(info))
        target.writestr(name, data)
        lines = [
            line
            for line in source.read(records[0]).decode().splitlines()
            if line and not line.startswith(f"{name},")
        ]
        lines.append(f"{name},{_record_hash(data)},{len(data)}")
        target.writestr(records[0].filename, "\n".join(lines) + "\n")
    os.replace(temporary, wheel)
