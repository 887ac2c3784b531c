"""Calibration at scale on one GPU: a ~1.1B-parameter Llama with K = 3 experts.

Measures, per run, the wall time and peak memory of each stage (from the
run's own report.json), the time per optimizer step and its floor (the
forward and backward passes alone) in each task-vector tier (resident,
compact, host, streamed) with the bytes each step reads, and the final write
against ``mergekit-yaml`` task_arithmetic on the same models. Weights are random (cost does not depend on what they know).

    python benchmarks/gpu_scale.py --out results.json            # on a GPU machine
    python benchmarks/gpu_scale.py --size tiny --device cpu ...  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import yaml

SIZES = {
    # TinyLlama-1.1B's shape.
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
}


def build_models(root: str, size: str, experts: int, device: str) -> dict:
    """Random base (bf16 on disk) and experts = base + small noise; a BPE tokenizer."""
    from transformers import LlamaForCausalLM

    from mergekit_expert.testing.corpus import top_level_sources
    from mergekit_expert.testing.models import add_noise_, llama_config, save_pretrained
    from mergekit_expert.testing.tokenizer import tiny_tokenizer

    shape = SIZES[size]
    tokenizer = tiny_tokenizer(top_level_sources(), min(4096, shape["vocab_size"]))
    config = llama_config(
        shape["vocab_size"],
        hidden=shape["hidden_size"],
        intermediate=shape["intermediate_size"],
        layers=shape["num_hidden_layers"],
        heads=shape["num_attention_heads"],
        kv_heads=shape["num_key_value_heads"],
        max_positions=2048,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    paths = {"base": os.path.join(root, "base")}
    save_pretrained(model, tokenizer, paths["base"])
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    for k in range(experts):
        # One model reused: expert k = base + N(0, 0.002^2) (float32 sum, bf16 on disk).
        add_noise_(model, k + 1, 0.002, reference=originals)
        paths[f"expert{k}"] = os.path.join(root, f"expert{k}")
        save_pretrained(model, tokenizer, paths[f"expert{k}"])
    del model, originals
    return {"paths": paths, "parameters": params, "config": SIZES[size]}


def write_calibration(root: str, experts: int, records: int) -> list[str]:
    """``records`` text records per expert, cut from the standard library's source."""
    from mergekit_expert.testing.calibration import write_jsonl
    from mergekit_expert.testing.corpus import top_level_sources

    texts = top_level_sources()
    return [
        write_jsonl(
            os.path.join(root, f"calibration{k}.jsonl"),
            (
                {"text": texts[(k * records + j) % len(texts)][:1500]}
                for j in range(records)
            ),
        )
        for k in range(experts)
    ]


def run(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return time.perf_counter() - started


def summarize(out: str) -> dict:
    report = json.load(open(os.path.join(out, "expert_merging", "report.json")))
    summary = {
        key: report.get(key)
        for key in (
            "method",
            "task_vectors",
            "precision",
            "device",
            "init",
            "loss",
            "stages",
        )
    }
    for stage in ("stage1", "stage2"):
        if stage in report:
            seconds = report[stage]["step_seconds"]
            summary[f"{stage}_steps"] = len(seconds)
            # The first step includes one-off warm-up (allocator, kernels).
            steady = seconds[1:] or seconds
            summary[f"{stage}_seconds_per_step"] = (
                sum(steady) / len(steady) if steady else None
            )
            passes = report[stage].get("pass_seconds") or []
            if len(passes) > 1:  # the floor: forward and backward passes alone
                summary[f"{stage}_pass_seconds"] = sum(passes[1:]) / len(passes[1:])
                summary[f"{stage}_bytes_read_per_step"] = report[stage]["bytes_read"][
                    -1
                ]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--root", default="/tmp/gpu_scale")
    parser.add_argument("--out", required=True)
    parser.add_argument("--experts", type=int, default=3)
    args = parser.parse_args()
    os.makedirs(args.root, exist_ok=True)
    results: dict = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
    }

    def save():
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)

    started = time.perf_counter()
    results["model"] = build_models(args.root, args.size, args.experts, args.device)
    results["build_s"] = round(time.perf_counter() - started, 1)
    save()
    paths = results["model"]["paths"]
    files = write_calibration(args.root, args.experts, records=5)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    flag = ["--cuda"] if args.device == "cuda" else []
    models = [
        {"model": paths[f"expert{k}"], "parameters": {"calibration": files[k]}}
        for k in range(args.experts)
    ]
    results["runs"] = []

    def calibrate(method: str, mode: str, extra: dict) -> None:
        document = {
            "merge_method": method,
            "base_model": paths["base"],
            "models": models,
            "dtype": "bfloat16",
            "calibration": {
                "task_vectors": mode,
                "max_length": 256,
                **extra,
            },
        }
        config = os.path.join(args.root, f"{method}-{mode}.yml")
        with open(config, "w", encoding="utf-8") as handle:
            yaml.safe_dump(document, handle)
        out = os.path.join(args.root, f"out-{method}-{mode}")
        wall = run(
            [sys.executable, "-m", "mergekit_expert", config, out, "--quiet", *flag],
            env,
        )
        results["runs"].append(
            {
                "method": method,
                "task_vectors": mode,
                "wall_s": round(wall, 1),
                **summarize(out),
            }
        )
        save()

    # Most important first: partial results are saved after each step.
    # reg_weight 0: the random experts' start is the optimum of any regularized
    # objective, and nothing would step; 5 prox steps time a step well enough.
    steps = {"reg_weight": 0.0, "max_steps": 5}
    calibrate("expert_merging", "resident", {"init": "auto", **steps})
    calibrate("expert_merging", "streamed", {"init": 0.3, **steps})
    baseline = {
        "merge_method": "task_arithmetic",
        "base_model": paths["base"],
        "models": [
            {"model": paths[f"expert{k}"], "parameters": {"weight": 0.3}}
            for k in range(args.experts)
        ],
        "dtype": "bfloat16",
    }
    config = os.path.join(args.root, "task_arithmetic.yml")
    with open(config, "w", encoding="utf-8") as handle:
        yaml.safe_dump(baseline, handle)
    wall = run(
        [
            sys.executable,
            "-m",
            "mergekit.scripts.run_yaml",
            config,
            os.path.join(args.root, "out-ta"),
            "--quiet",
            *flag,
        ],
        env,
    )
    results["task_arithmetic_mergekit_yaml_wall_s"] = round(wall, 1)
    # Same models, our kernel from an artifact: the write alone, as a separate process.
    artifact = os.path.join(
        args.root,
        "out-expert_merging-resident",
        "expert_merging",
        "coefficients.safetensors",
    )
    config = os.path.join(args.root, "expert_merging-resident.yml")
    wall = run(
        [
            sys.executable,
            "-m",
            "mergekit_expert",
            config,
            os.path.join(args.root, "out-write"),
            "--quiet",
            "--coefficients",
            artifact,
            *flag,
        ],
        env,
    )
    results["expert_merging_from_artifact_wall_s"] = round(wall, 1)
    results["write_ratio_vs_task_arithmetic"] = round(
        wall / results["task_arithmetic_mergekit_yaml_wall_s"], 3
    )
    save()
    # The other task-vector tiers, on the same settings as the two runs above.
    for tier in ("compact", "host"):
        calibrate("expert_merging", tier, {"init": 0.3, **steps})
    calibrate("expert_merging_pp", "resident", {"init": 0.3, **steps})
    results["total_s"] = round(time.perf_counter() - started, 1)
    save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
