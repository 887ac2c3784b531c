"""Write the small calibration sets that expert merging reads.

Expert merging fits its merge coefficients on a handful of examples per
expert, so each expert gets in-domain text from the *train* split only (the
test split must stay unseen by every method). Code and prose become short
``{"text"}`` chunks cut on line boundaries; arithmetic becomes prompt-only
``{"prompt"}`` records whose answer the plugin generates with the expert.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from domains import DataConfig, Domain, arithmetic_pairs


def text_chunks(
    docs: list[str],
    tokenizer: PreTrainedTokenizerFast,
    n: int,
    max_tokens: int,
    seed: int,
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


def write_calibration(
    domains: dict[str, Domain],
    data_cfg: DataConfig,
    tokenizer: PreTrainedTokenizerFast,
    out_dir: Path,
    per_domain: int = 20,
    max_tokens: int = 256,
) -> dict[str, Path]:
    """Write ``{domain}.jsonl`` files and return their paths keyed by domain."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = {
        name: [
            {"text": t}
            for t in text_chunks(
                domains[name].train,
                tokenizer,
                per_domain,
                max_tokens,
                data_cfg.seed + i,
            )
        ]
        for i, name in enumerate(("code", "prose"))
    }
    train_pairs = random.Random(data_cfg.seed).sample(
        arithmetic_pairs(data_cfg)[0], per_domain
    )
    records["arithmetic"] = [{"prompt": f"{a}+{b}="} for a, b in train_pairs]
    paths = {}
    for name, rows in records.items():
        paths[name] = out_dir / f"{name}.jsonl"
        paths[name].write_text(
            "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"
        )
    return paths
