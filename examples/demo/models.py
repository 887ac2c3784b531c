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
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bpe import train_tokenizer
from domains import DOMAINS, DataConfig, Domain
from evaluation import eval_blocks, mean_cross_entropy

# Bump when the training code changes in a way the settings below don't capture.
CODE_VERSION = 1
MODEL_NAMES: tuple[str, ...] = ("base", *DOMAINS)
MIN_GAIN = 0.02  # an expert must cut its domain's validation CE by at least 2%


@dataclass(frozen=True)
class TrainConfig:
    """Model shape and optimisation settings; part of the training fingerprint."""

    seed: int = 0
    vocab_size: int = 3000
    hidden: int = 128
    intermediate: int = 384
    layers: int = 4
    heads: int = 4
    seq_len: int = 128
    batch: int = 16
    base_steps: int = 800
    base_lr: float = 3e-3
    expert_steps: int = 120
    expert_lr: float = 1e-3
    warmup: int = 30
    weight_decay: float = 0.1
    val_blocks: int = 24  # held-out blocks per domain for the expert check


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


def token_stream(docs: list[str], tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """Concatenate documents as ``<s> doc </s>`` into one 1-D token tensor."""
    ids: list[int] = []
    for doc_ids in tokenizer(docs)["input_ids"]:
        ids += doc_ids + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def sample_batch(
    streams: list[torch.Tensor], cfg: TrainConfig, gen: torch.Generator
) -> torch.Tensor:
    """Random windows; each row picks a stream uniformly so domains are balanced."""
    rows = []
    for _ in range(cfg.batch):
        stream = streams[int(torch.randint(len(streams), (1,), generator=gen))]
        start = int(torch.randint(len(stream) - cfg.seq_len, (1,), generator=gen))
        rows.append(stream[start : start + cfg.seq_len])
    return torch.stack(rows)


def new_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama with tied embeddings (fewer parameters)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=2 * cfg.seq_len,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def train(
    model: LlamaForCausalLM,
    streams: list[torch.Tensor],
    steps: int,
    lr: float,
    cfg: TrainConfig,
    seed: int,
    label: str,
) -> None:
    """AdamW with linear warmup and cosine decay; logs a few loss values."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        return 0.1 + 0.45 * (
            1 + math.cos(math.pi * (step - cfg.warmup) / (steps - cfg.warmup))
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(steps):
        batch = sample_batch(streams, cfg, gen)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % max(1, steps // 5) == 0:
            print(
                f"  [{label}] step {step + 1}/{steps} loss {running / (steps // 5):.3f} "
                f"({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
            running = 0.0
    model.eval()


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
    tokenizer = train_tokenizer(
        (doc for d in domains.values() for doc in d.train), cfg.vocab_size
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
