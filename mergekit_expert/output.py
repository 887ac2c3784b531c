"""Where a run may write: the output rules, ``OUT.partial`` and the atomic publish.

OUT and ``OUT.partial`` (next to it) are the only paths a run writes, and it
never deletes what it did not create:

- OUT may not be, contain or lie inside any input (models, adapters,
  calibration data, images, the config, an artifact), and may not be or
  contain the working directory, the home directory or a filesystem root;
- an existing non-empty OUT is replaced (atomically, at the very end) only
  when it is recognisably a previous merge output, or with ``--overwrite``;
- ``OUT.partial`` is ours only when it carries our marker; a run holds an
  exclusive lock on it from start to end, so two runs never share it.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ExpertMergingError

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]

LOG = logging.getLogger(__name__)

MARKER = "fingerprint.json"
LOCK = "lock"

# Top-level names a merge writes into its output (mergekit's writer, its
# tokenizer and tag-along copies, this plugin's folder).
MERGE_OUTPUT_NAMES = (
    "mergekit_config.yml",
    "README.md",
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
    "chat_template.*",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "expert_merging",
)


@dataclass(frozen=True)
class InputPath:
    """A path the run reads, and how to name it in an error."""

    path: str
    what: str


def real(path: str) -> str:
    """Absolute path with ``~``, ``..`` and every symlink resolved."""
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _inside(child: str, parent: str) -> bool:
    """True when real path ``child`` is ``parent`` or lies below it."""
    return os.path.commonpath([child, parent]) == parent


def work_dir_for(out_path: str) -> str:
    return os.path.abspath(out_path).rstrip(os.sep) + ".partial"


def check_output_location(out_path: str, inputs: Iterable[InputPath]) -> None:
    """Refuse an OUT (or OUT.partial) that is, contains or lies in an input or a
    protected directory. Nothing is created or removed."""
    if os.path.islink(out_path.rstrip(os.sep) or out_path):
        raise ExpertMergingError(
            f"the output directory {out_path} is a symbolic link (to {real(out_path)}); "
            "a run replaces OUT as a whole, so give a real directory path instead"
        )
    out = real(out_path)
    partial = out + ".partial"
    fix = "choose a new output directory that holds none of your inputs"
    if out == os.path.dirname(out) or os.path.ismount(out):
        raise ExpertMergingError(
            f"the output directory {out_path} is a filesystem root; {fix}, e.g. ./merged"
        )
    protected = [
        (os.getcwd(), "the current directory"),
        (os.path.expanduser("~"), "your home directory"),
    ]
    for path, what in protected:
        if _inside(real(path), out):
            relation = "is" if real(path) == out else "contains"
            raise ExpertMergingError(
                f"the output directory {out_path} {relation} {what} ({real(path)}); "
                f"the run replaces OUT as a whole and would delete it: {fix}, "
                "e.g. ./merged"
            )
    for inp in inputs:
        source = real(inp.path)
        for target, label in (
            (out, "output directory"),
            (partial, "working directory"),
        ):
            shown = out_path if target == out else target
            if target == source:
                relation = "is"
            elif _inside(source, target):
                relation = "contains"
            elif _inside(target, source):
                relation = "lies inside"
            else:
                continue
            named = inp.what if inp.path in inp.what else f"{inp.what} {inp.path}"
            raise ExpertMergingError(
                f"the {label} {shown} {relation} {named}; the run replaces "
                f"{shown} as a whole and would destroy it: {fix}"
            )


def foreign_entries(out_path: str) -> list[str]:
    """What in an existing OUT a merge did not write ([] when OUT may be replaced).

    OUT may be replaced when it does not exist, is an empty directory, or is a
    previous merge output: a directory with a ``config.json`` or
    ``mergekit_config.yml`` holding only names a merge writes.
    """
    if not os.path.lexists(out_path):
        return []
    if not os.path.isdir(out_path) or os.path.islink(out_path):
        return [os.path.basename(out_path.rstrip(os.sep))]
    names = sorted(os.listdir(out_path))
    if not names:
        return []
    foreign = [
        name
        for name in names
        if not any(fnmatch.fnmatchcase(name, p) for p in MERGE_OUTPUT_NAMES)
    ]
    if not foreign and not {"config.json", "mergekit_config.yml"} & set(names):
        return names  # only tokenizer-like files: not recognisably a merge
    return foreign


def check_replaceable(out_path: str, overwrite: bool) -> None:
    """Refuse an existing OUT that is not a previous merge output, unless told to."""
    foreign = foreign_entries(out_path)
    if not foreign or overwrite:
        return
    shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
    raise ExpertMergingError(
        f"the output directory {out_path} already exists and holds files a merge does "
        f"not write ({shown}); a run replaces OUT as a whole, so they would be lost. "
        "Choose a new output directory, or pass --overwrite to replace it"
    )


class WorkDir:
    """``OUT.partial``: what a run needs to resume, and the staged OUT.

    :meth:`open` takes an exclusive lock held until :meth:`publish` or
    :meth:`close`; state written for other inputs is discarded under it.
    """

    def __init__(self, out_path: str, fingerprint_value: str):
        self.out_path = os.path.abspath(out_path)
        self.path = work_dir_for(out_path)
        self.fingerprint = fingerprint_value
        # Named like OUT: mergekit titles the model card after the directory.
        self.staging = os.path.join(self.path, os.path.basename(self.out_path))
        self._lock_fd: int | None = None

    def check_ours(self) -> None:
        """Refuse an ``OUT.partial`` this tool did not make."""
        path = self.path
        if os.path.islink(path):
            raise ExpertMergingError(
                f"{path} is a symbolic link; it is this tool's working directory "
                "and must be a real directory: remove the link or choose another OUT"
            )
        if not os.path.lexists(path):
            return
        if not os.path.isdir(path):
            raise ExpertMergingError(
                f"{path} exists and is not a directory made by mergekit-expert (it is "
                "the working directory of this OUT): move it away or choose another OUT"
            )
        names = set(os.listdir(path))
        if names and not names & {MARKER, LOCK}:
            raise ExpertMergingError(
                f"{path} exists and was not made by mergekit-expert (it has no "
                f"{MARKER}); it would be used as this OUT's working directory: move it "
                "away or choose another OUT"
            )

    def open(self) -> None:
        """Create or reuse the directory under an exclusive lock; discard stale state."""
        self.check_ours()
        created = not os.path.lexists(self.path)
        try:
            os.makedirs(self.path, exist_ok=True)
            self._lock()
        except OSError as error:
            raise os_error(
                error, f"cannot create the working directory {self.path}"
            ) from None
        except ExpertMergingError:
            if created:  # a refused run leaves nothing behind
                shutil.rmtree(self.path, ignore_errors=True)
            raise
        marker = self.file(MARKER)
        previous = None
        if os.path.exists(marker):
            try:
                with open(marker, encoding="utf-8") as handle:
                    previous = json.load(handle).get("fingerprint")
            except (OSError, ValueError, AttributeError):
                previous = None
        stale = [n for n in os.listdir(self.path) if n not in (LOCK, MARKER)]
        if previous != self.fingerprint and stale:
            LOG.warning(
                "discarding the saved state in %s: the config, a model, a "
                "calibration file or the mergekit-expert version changed since "
                "it was written; starting over",
                self.path,
            )
            for name in stale:
                _remove(os.path.join(self.path, name))
        elif stale:
            LOG.warning("resuming from the saved state in %s", self.path)
        with open(marker, "w", encoding="utf-8") as handle:
            json.dump(
                {"tool": "mergekit-expert", "fingerprint": self.fingerprint}, handle
            )
        if os.path.isdir(self.staging):
            shutil.rmtree(self.staging)  # a half-written output is never reused

    def _lock(self) -> None:
        if fcntl is None:
            return
        for _ in range(3):
            fd = os.open(self.file(LOCK), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise ExpertMergingError(
                        f"cannot lock {self.file(LOCK)} ({error.strerror}); this "
                        "filesystem does not support the lock that keeps two runs "
                        "apart: put OUT on a local filesystem"
                    ) from None
                raise ExpertMergingError(
                    f"another mergekit-expert run (pid {holder}) is writing "
                    f"{self.out_path}: it holds {self.file(LOCK)}. Wait for it to "
                    "finish, or stop it, or choose another OUT"
                ) from None
            try:
                same = os.stat(self.file(LOCK)).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file the previous holder removed while we waited
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._lock_fd = fd
                return
            os.close(fd)
            os.makedirs(self.path, exist_ok=True)
        raise ExpertMergingError(f"could not lock {self.file(LOCK)}; try again")

    def close(self) -> None:
        """Release the lock (the directory and its state stay for a resume)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def discard_staging(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def publish(self) -> None:
        """Move the staged output into place, then drop the working directory."""
        if os.path.lexists(self.out_path):
            os.replace(self.out_path, self.file("previous"))
        os.replace(self.staging, self.out_path)
        shutil.rmtree(self.path, ignore_errors=True)
        self.close()

    def remove(self) -> None:
        """Drop the working directory (nothing in it is needed to resume)."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.close()


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def os_error(error: OSError, doing: str) -> ExpertMergingError:
    """An OSError from the filesystem as an actionable error."""
    reason = error.strerror or str(error)
    hint = {
        errno.EACCES: "choose an output directory you can write to",
        errno.EPERM: "choose an output directory you can write to",
        errno.EROFS: "the filesystem is read-only; choose another output directory",
        errno.ENOSPC: "free some disk space, then run the same command again",
        errno.EFBIG: "the file grew beyond the allowed size; free space or raise the limit",
        errno.ENOTDIR: "a parent of the output path is a file, not a directory",
    }.get(error.errno or 0, "check the path and try again")
    where = f" ({error.filename})" if error.filename else ""
    return ExpertMergingError(f"{doing}: {reason}{where}; {hint}")
