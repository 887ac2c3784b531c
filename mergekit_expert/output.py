"""Where a run may write: the output rules, ``OUT.partial`` and the atomic publish.

OUT and ``OUT.partial`` (next to it) are the only paths a run writes, and it
never deletes what it did not create:

- OUT may not be, contain or lie inside any input (models, adapters,
  calibration data, images, the config, an artifact), and may not be or
  contain the working directory, the home directory or a filesystem root;
- an existing non-empty OUT is replaced (atomically, at the very end) only
  when an expert merge wrote it at this very path and nothing was added to it
  (``expert_merging/output.json`` names the path; a copied or downloaded
  merge, or any other model folder, does not qualify), or with ``--overwrite``;
  the check runs again just before the replace;
- ``OUT.partial`` is ours only when it carries our marker; a run holds an
  exclusive lock on it from start to end, so two runs never share it.

Every check and every write uses the same resolved path (:func:`real`), so a
symlink or ``..`` in OUT cannot make them disagree.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass

from .coefficients import ARTIFACT_DIR, ARTIFACT_NAME
from .errors import ExpertMergingError

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]

LOG = logging.getLogger(__name__)

MARKER = "fingerprint.json"
LOCK = "lock"
STAGING = "staging"  # OUT.partial/staging/<name of OUT>: the output being written
PREVIOUS = "previous"  # the replaced OUT, for the moment between two renames
# In OUT/expert_merging: which path the output was written for, so a run only
# replaces an output it made there (a copied or downloaded merge does not count).
OUTPUT_RECORD = "output.json"

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
    ARTIFACT_DIR,
)
# What a merge writes into OUT/expert_merging.
OUTPUT_FOLDER_NAMES = (
    ARTIFACT_NAME,
    "report.json",
    "coefficients.png",
    "calibration_config.yml",
    OUTPUT_RECORD,
)


@dataclass(frozen=True)
class InputPath:
    """A path the run reads, and how to name it in an error."""

    path: str
    what: str


def real(path: str) -> str:
    """Absolute path with ``~`` and every symlink resolved, and ``..`` taken the
    way the kernel takes it (after the symlink before it, not lexically)."""
    return os.path.realpath(os.path.expanduser(path))


def _inside(child: str, parent: str) -> bool:
    """True when real path ``child`` is ``parent`` or lies below it."""
    return os.path.commonpath([child, parent]) == parent


def work_dir_for(out_path: str) -> str:
    return real(out_path) + ".partial"


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


def output_record(out_path: str) -> dict[str, str]:
    """What ``expert_merging/output.json`` holds: the tool and a hash of OUT's
    resolved path (not the path itself, which a published model would leak)."""
    digest = hashlib.sha256(real(out_path).encode("utf-8", "surrogateescape"))
    return {"tool": "mergekit-expert", "output": digest.hexdigest()}


def _read_json(path: str) -> object:
    """A JSON file's value; None when it is missing, a link, unreadable or not JSON."""
    if os.path.islink(path) or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _written_here(out: str) -> bool:
    path = os.path.join(out, ARTIFACT_DIR, OUTPUT_RECORD)
    return _read_json(path) == output_record(out)


def why_not_replaceable(out_path: str) -> str | None:
    """Why an existing OUT may not be replaced (None when it may).

    OUT may be replaced when it does not exist, is an empty directory, or is
    an expert merge written for this very path that holds only what a merge
    writes.
    """
    out = real(out_path)
    if not os.path.lexists(out):
        return None
    if not os.path.isdir(out):
        return "is not a directory"
    names = sorted(os.listdir(out))
    if not names:
        return None
    if not _written_here(out):
        return (
            f"holds {_shown(names)} but no {ARTIFACT_DIR}/{OUTPUT_RECORD} naming "
            "this path (only an expert merge written there has one)"
        )
    foreign = [
        name
        for name in names
        if not any(fnmatch.fnmatchcase(name, p) for p in MERGE_OUTPUT_NAMES)
    ]
    folder = os.path.join(out, ARTIFACT_DIR)
    if os.path.isdir(folder) and not os.path.islink(folder):
        foreign += [
            f"{ARTIFACT_DIR}/{name}"
            for name in sorted(os.listdir(folder))
            if name not in OUTPUT_FOLDER_NAMES
        ]
    if not foreign:
        return None
    return f"holds files a merge does not write ({_shown(foreign)})"


def _shown(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def check_replaceable(out_path: str, overwrite: bool) -> None:
    """Refuse an existing OUT that is not an expert merge written there, unless
    told to."""
    reason = why_not_replaceable(out_path)
    if reason is None or overwrite:
        return
    raise ExpertMergingError(
        f"the output directory {out_path} already exists and {reason}; a run "
        "replaces OUT as a whole, so what is there would be lost. Choose a new "
        "output directory, or pass --overwrite to replace it"
    )


class WorkDir:
    """``OUT.partial``: what a run needs to resume, and the staged OUT.

    :meth:`open` takes an exclusive lock held until :meth:`publish` or
    :meth:`close`; state written for other inputs is discarded under it.
    """

    def __init__(self, out_path: str, fingerprint_value: str, overwrite: bool = False):
        self.out_path = real(out_path)
        self.path = work_dir_for(out_path)
        self.fingerprint = fingerprint_value
        self.overwrite = overwrite
        # Named like OUT (mergekit titles the model card after the directory),
        # in a folder of its own so that no name of OUT can collide with the
        # working directory's other entries.
        self.staging = os.path.join(self.path, STAGING, os.path.basename(self.out_path))
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
        if names and not (names <= {LOCK} or _our_marker(os.path.join(path, MARKER))):
            raise ExpertMergingError(
                f"{path} exists and was not made by mergekit-expert (it has no "
                f"{MARKER}); it would be used as this OUT's working directory: move it "
                "away or choose another OUT"
            )

    def open(self) -> None:
        """Create or reuse the directory under an exclusive lock; discard stale state."""
        self.check_ours()
        try:
            parent = os.path.dirname(self.path)
            if os.path.lexists(parent) and not os.path.isdir(parent):
                raise NotADirectoryError(
                    errno.ENOTDIR, os.strerror(errno.ENOTDIR), parent
                )
            os.makedirs(parent, exist_ok=True)
            try:  # whether this run made the directory, decided atomically
                os.mkdir(self.path)
                created = True
            except FileExistsError:
                created = False
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
        saved = _read_json(marker)
        previous = saved.get("fingerprint") if isinstance(saved, dict) else None
        try:
            self._restore_interrupted_publish()
        except BaseException:
            self.close()
            raise
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
        with open(marker + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(
                {"tool": "mergekit-expert", "fingerprint": self.fingerprint}, handle
            )
        os.replace(marker + ".tmp", marker)  # never a torn marker
        # A half-written output is never reused.
        shutil.rmtree(self.file(STAGING), ignore_errors=True)

    def _restore_interrupted_publish(self) -> None:
        """A run stopped between publish's two renames left the old OUT in
        ``previous``. Put it back when OUT is missing (or an empty folder);
        drop it when the new output had landed (it was being replaced); and
        refuse to guess when OUT holds anything else."""
        previous = self.file(PREVIOUS)
        if not os.path.lexists(previous):
            return
        out = self.out_path
        if os.path.isdir(out) and not os.path.islink(out) and not os.listdir(out):
            os.rmdir(out)
        if not os.path.lexists(out):
            os.replace(previous, out)
            LOG.warning(
                "restored %s from %s: an earlier run was stopped while replacing it",
                out,
                previous,
            )
        elif os.path.isdir(out) and _written_here(out):
            _remove(previous)
        else:
            raise ExpertMergingError(
                f"{previous} holds the output an earlier run was replacing when it "
                f"stopped, and {out} now holds something else; move one of them "
                "away, then run again"
            )

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
        shutil.rmtree(self.file(STAGING), ignore_errors=True)

    def record_output(self) -> None:
        """Mark the staged output as this tool's, written for OUT's path."""
        folder = os.path.join(self.staging, ARTIFACT_DIR)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, OUTPUT_RECORD), "w", encoding="utf-8") as out:
            json.dump(output_record(self.out_path), out)

    def publish(self) -> None:
        """Move the staged output into place, then drop the working directory.

        OUT is checked again first: it may have changed during the run (a file
        added to a previous output) since the check before any work."""
        reason = why_not_replaceable(self.out_path)
        if reason is not None and not self.overwrite:
            raise ExpertMergingError(
                f"the output directory {self.out_path} changed during the run and "
                f"now {reason}; it was left as it is. Move those files away and run "
                "the same command again, or pass --overwrite to replace it"
            )
        previous = self.file(PREVIOUS)
        if os.path.lexists(self.out_path):
            os.replace(self.out_path, previous)
        try:
            os.replace(self.staging, self.out_path)
        except BaseException:
            if os.path.lexists(previous):  # put the old OUT back
                os.replace(previous, self.out_path)
            raise
        shutil.rmtree(self.path, ignore_errors=True)
        self.close()

    def remove(self) -> None:
        """Drop the working directory (nothing in it is needed to resume),
        unless it still holds the old OUT (``previous``): then it stays."""
        if os.path.lexists(self.file(PREVIOUS)):
            LOG.error(
                "%s holds the previous %s, which could not be put back; move it "
                "back yourself",
                self.file(PREVIOUS),
                self.out_path,
            )
        else:
            shutil.rmtree(self.path, ignore_errors=True)
        self.close()


def _our_marker(path: str) -> bool:
    """True when ``path`` is a working-directory marker this tool wrote."""
    saved = _read_json(path)
    return isinstance(saved, dict) and saved.get("tool") == "mergekit-expert"


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
