"""End-to-end demo: train a base and three domain experts, merge them, compare.

Run from the repository root::

    python examples/demo/run.py --out demo_out

Everything is offline, seeded and sized for two CPU cores: the data ships with
Python, the models are tiny Llamas trained here (and cached across runs), and
every merge runs through its real command-line tool. The table compares each
merge against the base and the experts on held-out test data of all domains.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from mergekit_expert.testing.corpus import DOMAINS, DataConfig, Domain, load_domains
from mergekit_expert.testing.training import (
    TrainConfig,
    eval_blocks,
    mean_cross_entropy,
    token_stream,
)

from calibration import write_calibration
from merging import MERGES, run_merge, write_config
from models import MODEL_NAMES, train_all

TEST_BLOCKS = 48  # per domain, of TrainConfig.seq_len tokens each

TIMINGS: dict[str, float] = {}


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Print and record the wall time of one phase of the demo."""
    print(f"\n== {name} ==", flush=True)
    start = time.perf_counter()
    yield
    TIMINGS[name] = round(time.perf_counter() - start, 1)
    print(f"== {name}: {TIMINGS[name]:.1f}s ==", flush=True)


def evaluate(path: Path, blocks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Test cross-entropy per domain and their mean."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    row = {f"{name} CE": mean_cross_entropy(model, b) for name, b in blocks.items()}
    row["mean CE"] = sum(row.values()) / len(row)
    return row


def calibration_summary(merged: dict[str, Path]) -> str:
    """Initial alpha, calibration alignment losses and the objective's start and
    end (alignment + reg_weight * R) from each run's report.json."""
    lines = [
        "| merge | initial alpha | task arithmetic at init | stage 1 | stage 2 "
        "| objective start -> end | coefficients moved |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, path in merged.items():
        report_path = path / "expert_merging" / "report.json"
        if not report_path.exists():
            continue
        report = json.loads(report_path.read_text(encoding="utf-8"))
        loss = report["loss"]
        stage2 = f"{loss['stage2']:.5f}" if "stage2" in loss else "-"
        last = report.get("stage2") or report["stage1"]
        start = report["stage1"]["objective"][0]
        end = last["objective"][last["kept_epoch"]]
        moved = report["outcome"]["moved"]
        lines.append(
            f"| {label} | {report['init'][0]:.2f} | {loss['task_arithmetic_init']:.5f} "
            f"| {loss['stage1']:.5f} | {stage2} | {start:.5f} -> {end:.5f} "
            f"| {'yes' if moved else 'NO: ' + report['outcome']['message']} |"
        )
    return "\n".join(lines)


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    """Rows as a markdown table; cross-entropy in nats/token, lower is better."""
    columns = list(next(iter(rows.values())))
    lines = [
        "| model | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for label, row in rows.items():
        cells = [f"{row[c]:.3f}" for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    hf_logging.disable_progress_bar()
    data_cfg, train_cfg = DataConfig(), TrainConfig()
    model_dir = out / "models"
    total_start = time.perf_counter()

    with phase("data"):
        domains: dict[str, Domain] = load_domains(data_cfg)
        for d in domains.values():
            print(
                f"  {d.name}: {len(d.train)} train / {len(d.val)} val / "
                f"{len(d.test)} test documents"
            )
    with phase("training"):
        tokenizer = train_all(domains, data_cfg, train_cfg, model_dir)
    with phase("calibration"):
        calib = write_calibration(domains, data_cfg, tokenizer, out / "calibration")
        print("  " + ", ".join(str(p) for p in calib.values()))

    merged: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    with phase("merging"):
        for merge in MERGES:
            config = out / f"{merge.method}.yml"
            write_config(merge, model_dir, list(DOMAINS), calib, config)
            target = out / "merged" / merge.method
            error = run_merge(
                merge, config, target, out / "logs" / f"{merge.method}.log"
            )
            if error:
                print(f"  SKIPPED {merge.label}: {error}")
                skipped[merge.label] = error
            else:
                merged[merge.label] = target

    rows: dict[str, dict[str, float]] = {}
    with phase("evaluation"):
        blocks = {
            name: eval_blocks(
                token_stream(d.test, tokenizer), train_cfg.seq_len, TEST_BLOCKS
            )
            for name, d in domains.items()
        }
        print(
            "  test tokens per domain: "
            + ", ".join(f"{n}={b.numel()}" for n, b in blocks.items())
        )
        candidates = {name: model_dir / name for name in MODEL_NAMES} | merged
        for label, path in candidates.items():
            rows[label] = evaluate(path, blocks)
            print(
                f"  {label}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in rows[label].items())
            )

    TIMINGS["total"] = round(time.perf_counter() - total_start, 1)
    table = markdown_table(rows)
    notes = "".join(
        f"\n\nSkipped {label}: {err.splitlines()[0]}" for label, err in skipped.items()
    )
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in TIMINGS.items())
    report = (
        f"Held-out test cross-entropy (nats/token, lower is better).\n\n{table}{notes}"
        f"\n\nCalibration alignment loss (lower is better; stage 2 is Expert "
        f"Merging++'s chunk-wise stage):\n\n{calibration_summary(merged)}"
        f"\n\nWall time: {timing}\n"
    )
    (out / "results.md").write_text(report, encoding="utf-8")
    (out / "results.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "skipped": skipped,
                "timings_s": TIMINGS,
                "test_tokens": {n: b.numel() for n, b in blocks.items()},
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    print("\n" + report)
    if skipped:
        raise SystemExit(f"{len(skipped)} merge(s) failed: {', '.join(skipped)}")


if __name__ == "__main__":
    main()
