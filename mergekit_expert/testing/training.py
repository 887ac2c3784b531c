"""Train and score tiny Llamas: the demo's loop, shared with the quality benchmarks.

Where a merge's quality is measured the experts must really know something,
so the demo and ``benchmarks/quality.py`` pre-train a base on a mixture of
domains and fine-tune one expert per domain with this loop (AdamW, linear
warm-up, cosine decay, random windows of token streams). Held-out scores are
mean token cross-entropy on fixed blocks, so every model is scored on exactly
the same tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .models import llama_config, token_ids


@dataclass(frozen=True)
class TrainConfig:
    """Model shape and optimisation settings; part of a training fingerprint."""

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


def token_stream(docs: list[str], tokenizer) -> torch.Tensor:
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


def new_model(cfg: TrainConfig, tokenizer):
    """A freshly initialised tiny Llama with tied embeddings (fewer parameters)."""
    from transformers import LlamaForCausalLM

    config = llama_config(
        len(tokenizer),
        hidden=cfg.hidden,
        intermediate=cfg.intermediate,
        layers=cfg.layers,
        heads=cfg.heads,
        max_positions=2 * cfg.seq_len,
        tie_embeddings=True,
        **token_ids(tokenizer),
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def train(
    model,
    streams: list[torch.Tensor],
    steps: int,
    lr: float,
    cfg: TrainConfig,
    seed: int,
    label: str,
) -> None:
    """AdamW with linear warmup and cosine decay; logs a few loss values.

    Batches are drawn on the CPU (the same windows on any device) and moved to
    the model's device.
    """
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
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
        batch = sample_batch(streams, cfg, gen).to(device)
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


def eval_blocks(stream: torch.Tensor, seq_len: int, max_blocks: int) -> torch.Tensor:
    """The first ``max_blocks`` non-overlapping windows of a token stream."""
    n = min(max_blocks, len(stream) // seq_len)
    return stream[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def mean_cross_entropy(model, blocks: torch.Tensor, batch: int = 32) -> float:
    """Token-weighted mean next-token cross-entropy (nats) over all blocks."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        chunk = blocks[i : i + batch]
        logits = model(input_ids=chunk).logits[:, :-1].float()
        targets = chunk[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += targets.numel()
    return total / count
