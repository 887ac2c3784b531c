"""Accuracy cost of a top-k teacher cache, measured on the demo's models.

For k in (full, 256, 64, 16) it calibrates ``expert_merging`` on the demo's
base, experts and calibration files with ``calibration: {teacher_top_k: k}``
and reports the held-out test cross-entropy per domain of the merged model,
the largest coefficient difference from the full-vocabulary run, and the size
of the teacher cache. Run ``make demo`` first (it trains and caches the
models), then ``python benchmarks/topk_cost.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from mergekit_expert.testing.corpus import DataConfig, load_domains
from mergekit_expert.testing.training import (
    TrainConfig,
    eval_blocks,
    mean_cross_entropy,
    token_stream,
)

TOP_K = (None, 256, 64, 16)


def main() -> None:
    demo_out = Path(sys.argv[1] if len(sys.argv) > 1 else "demo_out")
    config = demo_out / "expert_merging.yml"
    if not config.exists():
        raise SystemExit(f"{config} not found: run `make demo` first")
    work = Path("bench_out/topk")
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(demo_out / "models" / "base")
    vocab = len(tokenizer)
    blocks = {
        name: eval_blocks(token_stream(d.test, tokenizer), TrainConfig().seq_len, 48)
        for name, d in load_domains(DataConfig()).items()
    }
    cli = Path(sys.executable).parent / "mergekit-expert"
    rows, reference = [], None
    for k in TOP_K:
        document = yaml.safe_load(config.read_text())
        document.setdefault("calibration", {})["teacher_top_k"] = k
        path = work / f"top{k or 'full'}.yml"
        path.write_text(yaml.safe_dump(document))
        out = work / f"merged-top{k or 'full'}"
        subprocess.run(
            [str(cli), str(path), str(out), "--quiet"], check=True, capture_output=True
        )
        coefficients = load_file(out / "expert_merging" / "coefficients.safetensors")
        if reference is None:
            reference = coefficients
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        ce = {name: mean_cross_entropy(model, b) for name, b in blocks.items()}
        report = json.loads((out / "expert_merging" / "report.json").read_text())
        rows.append(
            {
                "top_k": k or vocab,
                # float32 logits, or float32 values + int64 indices of the top k
                "cache_bytes_per_position": 4 * vocab if k is None else 12 * k,
                "test_ce": ce,
                "mean_test_ce": sum(ce.values()) / len(ce),
                "calibration_loss": report["loss"]["stage1"],
                "max_coefficient_diff_vs_full": max(
                    float((coefficients[n] - reference[n]).abs().max())
                    for n in reference
                ),
            }
        )
        print(rows[-1], flush=True)
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / "topk.json").write_text(
        json.dumps({"vocab": vocab, "rows": rows}, indent=2)
    )
    lines = [
        f"# Top-k teacher cache: accuracy cost (demo models, vocabulary {vocab})",
        "",
        "Written by `python benchmarks/topk_cost.py` after `make demo`: `expert_merging` "
        "calibrated with `teacher_top_k: k`, held-out test cross-entropy of the merged "
        "model (nats/token) and the largest coefficient change against the full cache.",
        "",
        "| teacher_top_k | cache bytes / position | mean test CE | code | prose | arithmetic | max coefficient diff vs full |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ce = row["test_ce"]
        lines.append(
            f"| {row['top_k']} | {row['cache_bytes_per_position']} | {row['mean_test_ce']:.4f} | "
            f"{ce['code']:.4f} | {ce['prose']:.4f} | {ce['arithmetic']:.4f} | "
            f"{row['max_coefficient_diff_vs_full']:.4f} |"
        )
    (results / "topk.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
