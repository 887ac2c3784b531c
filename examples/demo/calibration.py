"""Write the small calibration sets that expert merging reads.

Expert merging fits its merge coefficients on a handful of examples per
expert, so each expert gets in-domain text from the *train* split only (the
test split must stay unseen by every method). Code and prose become short
``{"text"}`` chunks cut on line boundaries; arithmetic becomes prompt-only
``{"prompt"}`` records whose answer the plugin generates with the expert.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

from mergekit_expert.testing.calibration import sum_prompts, text_records, write_sets
from mergekit_expert.testing.corpus import DataConfig, Domain, arithmetic_pairs


def write_calibration(
    domains: dict[str, Domain],
    data_cfg: DataConfig,
    tokenizer: PreTrainedTokenizerFast,
    out_dir: Path,
    per_domain: int = 20,
    max_tokens: int = 256,
) -> dict[str, Path]:
    """Write ``{domain}.jsonl`` files and return their paths keyed by domain."""
    records = {
        name: text_records(
            domains[name].train, tokenizer, per_domain, max_tokens, data_cfg.seed + i
        )
        for i, name in enumerate(("code", "prose"))
    }
    records["arithmetic"] = sum_prompts(
        arithmetic_pairs(data_cfg)[0], per_domain, data_cfg.seed
    )
    return write_sets(out_dir, records)
