"""Calibration records: reading and validation, and the seeded choice of samples.

A record is one of ``{"text"}``, ``{"prompt"[, "response"]}`` or chat
``{"messages": [{"role", "content"}, ...]}``, read from JSONL/JSON/text/parquet
files or a ``datasets`` directory. Every record is parsed and validated (and
every image opened) before any model is loaded; tokenization happens later,
with each expert's own tokenizer (:mod:`mergekit_expert.data`).

For vision-language experts a record may carry ``image`` (a path or a list of
paths, relative to the data file) and chat contents with image parts.
"""

from __future__ import annotations

import json
import logging
import os
import random
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from .config import AUTO_SAMPLES
from .errors import ExpertMergingError

SUPPORTED = "a .jsonl/.json/.txt/.parquet file or a directory saved with datasets"


# A chat message's content: a string, or parts ("text", str) / ("image", path).
Content = str | tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class CalibrationRecord:
    where: str  # "file:line" for error messages
    text: str | None = None
    prompt: str | None = None
    response: str | None = None
    messages: tuple[tuple[str, Content], ...] | None = None
    images: tuple[str, ...] = ()  # absolute paths, in the order they appear

    @property
    def needs_response(self) -> bool:
        """True when the aligned sequence needs a pseudo-label from the expert."""
        if self.text is not None:
            return False
        if self.messages is not None:
            return self.messages[-1][0] != "assistant"
        return self.response is None


def _raw_rows(path: str) -> Iterator[tuple[str, object]]:
    """Yield (location, raw row) for every record in a calibration source."""
    if os.path.isdir(path):
        import datasets

        try:
            loaded = datasets.load_from_disk(path)
        except Exception as error:
            raise ExpertMergingError(
                f"{path}: not a dataset saved with datasets.save_to_disk ({error}); "
                f"calibration data must be {SUPPORTED}"
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            split = "train" if "train" in loaded else next(iter(loaded), None)
            if split is None:
                return
            loaded = loaded[split]
        for index, row in enumerate(loaded):
            yield f"{path}:{index}", row
        return
    extension = os.path.splitext(path)[1].lower()
    if extension == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as error:
            raise ExpertMergingError(
                f"{path}: unreadable parquet file ({error})"
            ) from None
        for index, row in enumerate(rows):
            yield f"{path}:row {index}", row
        return
    try:
        with open(path, encoding="utf-8") as handle:
            content = handle.read()
    except UnicodeDecodeError as error:
        raise ExpertMergingError(
            f"{path}: not UTF-8 text (byte {error.start}); save calibration files as UTF-8"
        ) from None
    if extension == ".jsonl":
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise ExpertMergingError(
                    f"{path}:{number}: invalid JSON ({error.msg}); each line must be "
                    'one object such as {"text": ...}'
                ) from None
            except RecursionError:
                raise ExpertMergingError(
                    f"{path}:{number}: JSON nested too deeply to be a record"
                ) from None
    elif extension == ".json":
        try:
            rows = json.loads(content)
        except json.JSONDecodeError as error:
            raise ExpertMergingError(
                f"{path}:{error.lineno}: invalid JSON ({error.msg})"
            ) from None
        except RecursionError:
            raise ExpertMergingError(f"{path}: JSON nested too deeply") from None
        if not isinstance(rows, list):
            raise ExpertMergingError(
                f"{path}: a .json calibration file must hold a list of records"
            )
        for index, row in enumerate(rows):
            yield f"{path}:[{index}]", row
    elif extension in (".txt", ".text", ".md"):
        for number, line in enumerate(content.splitlines(), start=1):
            if line.strip():
                yield f"{path}:{number}", {"text": line}
    else:
        raise ExpertMergingError(
            f"{path}: unsupported calibration file type {extension!r}; use {SUPPORTED}"
        )


def _string(row: dict, key: str, where: str) -> str | None:
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise ExpertMergingError(f"{where}: field {key!r} must be a string")
    return None if value is None else _unicode(value, where, key)


def _unicode(value: str, where: str, key: str) -> str:
    """Text a tokenizer can take: no lone surrogate halves (e.g. "\\ud800")."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ExpertMergingError(
            f"{where}: field {key!r} holds an unpaired surrogate "
            f"({value[error.start]!r} at character {error.start}), which is not "
            "valid Unicode text; fix the escape sequence in the file"
        ) from None
    return value


def _image_paths(row: dict, where: str, folder: str) -> list[str]:
    """The record's ``image`` field as absolute paths (relative to its data file)."""
    value = row.get("image")
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(
        isinstance(v, str) and v for v in values
    ):
        raise ExpertMergingError(
            f"{where}: 'image' must be a path or a list of paths (strings)"
        )
    return [os.path.normpath(os.path.join(folder, v)) for v in values]


def _content(value: object, where: str, images: list[str], folder: str) -> Content:
    """A message's content: a string, or a list of text and image parts.

    An image part names its file (``{"type": "image", "image": PATH}``) or
    takes the next path of the record's ``image`` list.
    """
    if isinstance(value, str):
        return _unicode(value, where, "content")
    if not isinstance(value, list) or not value:
        raise ExpertMergingError(
            f"{where}: a message's 'content' must be a string or a non-empty list of "
            'parts such as {"type": "text", "text": ...} or {"type": "image"}'
        )
    parts = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(("text", _unicode(part["text"], where, "text")))
        elif kind == "image":
            path = part.get("image") or part.get("path")
            if path is None:
                if not images:
                    raise ExpertMergingError(
                        f"{where}: an image part has no path and the record's 'image' "
                        "list has no path left for it"
                    )
                parts.append(("image", images.pop(0)))
            elif isinstance(path, str):
                parts.append(("image", os.path.normpath(os.path.join(folder, path))))
            else:
                raise ExpertMergingError(
                    f"{where}: an image part's path must be a string"
                )
        else:
            raise ExpertMergingError(
                f"{where}: unsupported content part {part!r}; use "
                '{"type": "text", "text": ...} or {"type": "image"[, "image": PATH]}'
            )
    return tuple(parts)


def _images_in(messages: Sequence[tuple[str, Content]]) -> tuple[str, ...]:
    return tuple(
        value
        for _role, content in messages
        if not isinstance(content, str)
        for kind, value in content
        if kind == "image"
    )


def check_image(path: str, where: str) -> None:
    """Fail early, naming the record, when an image is missing or unreadable."""
    if not os.path.isfile(path):
        raise ExpertMergingError(
            f"{where}: image {path!r} does not exist (image paths are relative to the "
            "calibration file)"
        )
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:
        raise ExpertMergingError(
            f"{where}: image {path!r} cannot be read as an image ({error})"
        ) from None


def parse_record(row: object, where: str, folder: str = ".") -> CalibrationRecord:
    """One validated record; ``folder`` is the directory image paths are relative to."""
    if not isinstance(row, dict):
        raise ExpertMergingError(
            f"{where}: a record must be an object, got {type(row).__name__}"
        )
    images = _image_paths(row, where, folder)
    if row.get("messages") is not None:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ExpertMergingError(f"{where}: 'messages' must be a non-empty list")
        parsed = []
        for message in messages:
            if not isinstance(message, dict) or not isinstance(
                message.get("role"), str
            ):
                raise ExpertMergingError(
                    f"{where}: each message needs a string 'role' and a 'content'"
                )
            content = _content(message.get("content"), where, images, folder)
            parsed.append((_unicode(message["role"], where, "role"), content))
        if images:  # paths not claimed by an image part go before the first text
            role, content = parsed[0]
            if isinstance(content, str):
                content = (("text", content),)
            parsed[0] = (role, tuple(("image", p) for p in images) + content)
        final_role, final = parsed[-1]
        if final_role == "assistant" and not isinstance(final, str):
            if any(kind == "image" for kind, _ in final):
                raise ExpertMergingError(
                    f"{where}: images are supported in prompt turns only, not in the "
                    "final assistant turn"
                )
        record = CalibrationRecord(
            where, messages=tuple(parsed), images=_images_in(parsed)
        )
        for path in record.images:
            check_image(path, where)
        return record
    text = _string(row, "text", where)
    prompt = _string(row, "prompt", where)
    response = _string(row, "response", where)
    if text is not None:
        if not text.strip():
            raise ExpertMergingError(f"{where}: 'text' is empty")
        if images:
            raise ExpertMergingError(
                f"{where}: 'image' goes with a 'prompt' or 'messages', not with 'text'"
            )
        return CalibrationRecord(where, text=text)
    if prompt is not None:
        if not prompt.strip():
            raise ExpertMergingError(f"{where}: 'prompt' is empty")
        for path in images:
            check_image(path, where)
        return CalibrationRecord(
            where, prompt=prompt, response=response, images=tuple(images)
        )
    raise ExpertMergingError(
        f"{where}: a record needs 'text', 'prompt' (with optional 'response') or "
        f"'messages'; found fields {sorted(row)}"
    )


def load_records(path: str) -> list[CalibrationRecord]:
    """Read and validate every record of one expert's calibration source."""
    if not os.path.exists(path):
        raise ExpertMergingError(
            f"calibration file {path!r} does not exist (paths are relative to the "
            "directory you run mergekit-expert from)"
        )
    if not (os.path.isdir(path) or stat.S_ISREG(os.stat(path).st_mode)):
        raise ExpertMergingError(
            f"calibration file {path!r} is not a regular file (a pipe or device "
            f"cannot be read ahead of time); give {SUPPORTED}"
        )
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    records = [parse_record(row, where, folder) for where, row in _raw_rows(path)]
    if not records:
        raise ExpertMergingError(f"calibration file {path!r} holds no records")
    return records


def choose_records(
    records: Sequence[CalibrationRecord],
    count: int | Literal["auto"],
    seed: int,
    *,
    allow_fewer: bool,
    source: str,
) -> list[CalibrationRecord]:
    """The seeded subset of ``count`` records an expert calibrates on
    (``auto``: ``AUTO_SAMPLES``, or all of them when there are fewer)."""
    if count != "auto":
        return _seeded_subset(
            records, count, seed, allow_fewer=allow_fewer, source=source
        )
    if len(records) < AUTO_SAMPLES:
        logging.getLogger(__name__).info(
            "%s has %d records; samples_per_expert: auto uses them all (it takes "
            "up to %d)",
            source,
            len(records),
            AUTO_SAMPLES,
        )
    number = min(len(records), AUTO_SAMPLES)
    return _seeded_subset(records, number, seed, allow_fewer=True, source=source)


def _seeded_subset(
    records: Sequence[CalibrationRecord],
    count: int,
    seed: int,
    *,
    allow_fewer: bool,
    source: str,
) -> list[CalibrationRecord]:
    """``count`` records drawn with ``seed`` (in file order)."""
    if len(records) < count:
        if not allow_fewer:
            raise ExpertMergingError(
                f"{source} has {len(records)} records but samples_per_expert is "
                f"{count}; add records, lower calibration.samples_per_expert, or set "
                "calibration.allow_fewer_samples: true"
            )
        logging.getLogger(__name__).warning(
            "%s has %d records, fewer than samples_per_expert=%d; using them all",
            source,
            len(records),
            count,
        )
        return list(records)
    if len(records) == count:
        return list(records)
    chosen = sorted(random.Random(seed).sample(range(len(records)), count))
    return [records[i] for i in chosen]
