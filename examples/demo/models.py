"""Pretrain a tiny Llama base on the mixture, then fine-tune one expert per domain.

All four models share one tokenizer and one architecture and the experts all
start from the same base weights, which is what task-vector merges (task
arithmetic, expert merging) assume. Training is cached: a fingerprint of every
setting that affects the weights is stored next to the models, and a re-run
with the same fingerprint loads them instead of training again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from mergekit_expert.testing.corpus import DOMAINS, DataConfig, Domain
from mergekit_expert.testing.tokenizer import bos_tokenizer
from mergekit_expert.testing.training import (
    TrainConfig,
    eval_blocks,
    mean_cross_entropy,
    new_model,
    token_stream,
    train,
)

# Bump when the training code changes in a way the settings below don't capture.
CODE_VERSION = 1
MODEL_NAMES: tuple[str, ...] = ("base", *DOMAINS)
MIN_GAIN = 0.02  # an expert must cut its domain's validation CE by at least 2%


def fingerprint(
    data_cfg: DataConfig, train_cfg: TrainConfig, domains: dict[str, Domain]
) -> str:
    """Hash of everything that determines the trained weights.

    The documents themselves are hashed too, so a change in how the data is
    read or split (or a different Python's stdlib) invalidates the cache even
    when no setting changed.
    """
    digest = hashlib.sha256()
    settings = {
        "data": asdict(data_cfg),
        "train": asdict(train_cfg),
        "code": CODE_VERSION,
        "torch": torch.__version__,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for domain in domains.values():
        for split in (domain.train, domain.val):
            for doc in split:
                digest.update(doc.encode() + b"\0")
            digest.update(b"\1")
    return digest.hexdigest()[:16]


def _cached(model_dir: Path, fp: str) -> bool:
    """True if all models exist and were trained with the same settings."""
    meta = model_dir / "fingerprint.json"
    if not meta.exists() or json.loads(meta.read_text()).get("fingerprint") != fp:
        return False
    return all((model_dir / n / "model.safetensors").exists() for n in MODEL_NAMES)


def train_all(
    domains: dict[str, Domain], data_cfg: DataConfig, cfg: TrainConfig, model_dir: Path
) -> PreTrainedTokenizerFast:
    """Train (or load from cache) the tokenizer, base and experts; return the tokenizer."""
    fp = fingerprint(data_cfg, cfg, domains)
    if _cached(model_dir, fp):
        print(f"models cached in {model_dir} (fingerprint {fp}); skipping training")
        return PreTrainedTokenizerFast.from_pretrained(model_dir / "base")

    torch.manual_seed(cfg.seed)
    # One digit per token: with multi-digit tokens a small model has to
    # memorise sums token by token instead of learning carries.
    tokenizer = bos_tokenizer(
        (doc for d in domains.values() for doc in d.train),
        cfg.vocab_size,
        split_digits=True,
    )
    train_streams = {n: token_stream(d.train, tokenizer) for n, d in domains.items()}
    val_blocks = {
        n: eval_blocks(token_stream(d.val, tokenizer), cfg.seq_len, cfg.val_blocks)
        for n, d in domains.items()
    }
    print(
        "train tokens: " + ", ".join(f"{n}={len(s)}" for n, s in train_streams.items())
    )

    base = new_model(cfg, tokenizer)
    print(f"base: {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters")
    train(
        base,
        list(train_streams.values()),
        cfg.base_steps,
        cfg.base_lr,
        cfg,
        cfg.seed,
        "base",
    )
    base.save_pretrained(model_dir / "base", safe_serialization=True)
    tokenizer.save_pretrained(model_dir / "base")
    base_val = {n: mean_cross_entropy(base, b) for n, b in val_blocks.items()}

    for i, name in enumerate(DOMAINS, start=1):
        expert = LlamaForCausalLM.from_pretrained(
            model_dir / "base", dtype=torch.float32
        )
        train(
            expert,
            [train_streams[name]],
            cfg.expert_steps,
            cfg.expert_lr,
            cfg,
            cfg.seed + i,
            name,
        )
        expert.save_pretrained(model_dir / name, safe_serialization=True)
        tokenizer.save_pretrained(model_dir / name)
        own = mean_cross_entropy(expert, val_blocks[name])
        # Relative margin: arithmetic CE is dominated by unpredictable operand
        # digits, so its absolute gains are small even for a good expert.
        clearly_better = own < (1 - MIN_GAIN) * base_val[name]
        verdict = "ok" if clearly_better else "FAIL: expert not clearly better"
        print(
            f"  check {name}: validation CE base {base_val[name]:.3f} -> expert {own:.3f} "
            f"[{verdict}]"
        )

    (model_dir / "fingerprint.json").write_text(
        json.dumps(
            {"fingerprint": fp, "data": asdict(data_cfg), "train": asdict(cfg)},
            indent=2,
        )
    )
    return tokenizer
