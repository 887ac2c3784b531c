"""Calibration at scale on one GPU: a ~1.1B-parameter Llama with K = 3 experts.

Measures, per run, the wall time and peak memory of each stage (from the
run's own report.json), the time per optimizer step, resident vs streamed
task vectors, and the final write against ``mergekit-yaml`` task_arithmetic on
the same models. Weights are random (cost does not depend on what they know).

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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = corpus()
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=min(4096, SIZES[size]["vocab_size"]),
            special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    config = LlamaConfig(
        **SIZES[size],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    paths = {"base": os.path.join(root, "base")}
    model.save_pretrained(paths["base"])
    wrapped.save_pretrained(paths["base"])
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    for k in range(experts):
        generator = torch.Generator(device=device).manual_seed(k + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn(
                    p.shape, generator=generator, device=device, dtype=torch.float32
                )
                p.copy_((originals[name].float() + 0.002 * noise).to(p.dtype))
        paths[f"expert{k}"] = os.path.join(root, f"expert{k}")
        model.save_pretrained(paths[f"expert{k}"])
        wrapped.save_pretrained(paths[f"expert{k}"])
    del model, originals
    return {"paths": paths, "parameters": params, "config": SIZES[size]}


def corpus() -> list[str]:
    """Real text that ships with Python: the standard library's own source."""
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    texts = []
    for name in sorted(os.listdir(stdlib))[:80]:
        if name.endswith(".py"):
            with open(
                os.path.join(stdlib, name), encoding="utf-8", errors="replace"
            ) as handle:
                texts.append(handle.read()[:6000])
    return texts


def write_calibration(root: str, experts: int, records: int) -> list[str]:
    texts = corpus()
    files = []
    for k in range(experts):
        path = os.path.join(root, f"calibration{k}.jsonl")
        with open(path, "w", encoding="utf-8") as handle:
            for j in range(records):
                handle.write(
                    json.dumps({"text": texts[(k * records + j) % len(texts)][:1500]})
                    + "\n"
                )
        files.append(path)
    return files


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
            summary[f"{stage}_seconds_per_step"] = sum(steady) / len(steady)
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
                "epochs": 2,
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
    calibrate("expert_merging", "resident", {"init": "auto"})
    calibrate("expert_merging", "streamed", {"init": 0.3})
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
    calibrate("expert_merging_pp", "resident", {"init": 0.3})
    results["total_s"] = round(time.perf_counter() - started, 1)
    save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
