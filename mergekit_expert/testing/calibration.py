"""Calibration files: JSON Lines records, one file per expert.

Expert merging fits its coefficients on a handful of records per expert.
Fixtures write them here: ``{"text"}`` chunks cut on line boundaries from a
domain's *train* split (the test split must stay unseen by every method) and
prompt-only ``{"prompt"}`` sums whose answer the plugin generates with the
expert.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Mapping
from pathlib import Path


def write_jsonl(path, rows: Iterable[dict]) -> str:
    """One JSON object per line; returns the path as a string."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return os.fspath(path)


def write_sets(folder: Path, records: Mapping[str, list[dict]]) -> dict[str, Path]:
    """``folder/{name}.jsonl`` per entry of ``records``; their paths by name."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in records.items():
        paths[name] = folder / f"{name}.jsonl"
        write_jsonl(paths[name], rows)
    return paths


def text_chunks(
    docs: list[str], tokenizer, n: int, max_tokens: int, seed: int
) -> list[str]:
    """``n`` seeded chunks of whole lines, each at most ``max_tokens`` tokens."""
    rng = random.Random(seed)
    chunks: list[str] = []
    while len(chunks) < n:
        lines = rng.choice(docs).splitlines(keepends=True)
        start = rng.randrange(len(lines))
        chunk = ""
        for line in lines[start:]:
            if len(tokenizer(chunk + line)["input_ids"]) > max_tokens:
                break
            chunk += line
        if len(tokenizer(chunk.strip())["input_ids"]) >= max_tokens // 4:
            chunks.append(chunk.strip())
    return chunks


def text_records(
    docs: list[str], tokenizer, n: int, max_tokens: int, seed: int
) -> list[dict]:
    """:func:`text_chunks` as ``{"text"}`` records."""
    return [{"text": t} for t in text_chunks(docs, tokenizer, n, max_tokens, seed)]


def sum_prompts(pairs: list[tuple[int, int]], n: int, seed: int) -> list[dict]:
    """``n`` seeded operand pairs as prompt-only ``{"prompt": "a+b="}`` records."""
    return [{"prompt": f"{a}+{b}="} for a, b in random.Random(seed).sample(pairs, n)]
