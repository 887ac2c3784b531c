"""Held-out metric: mean token cross-entropy per domain.

Cross-entropy is computed on a fixed list of non-overlapping blocks cut from
the test stream, so every model is scored on exactly the same tokens and the
numbers are comparable across rows and across runs.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def eval_blocks(stream: torch.Tensor, seq_len: int, max_blocks: int) -> torch.Tensor:
    """The first ``max_blocks`` non-overlapping windows of a token stream."""
    n = min(max_blocks, len(stream) // seq_len)
    return stream[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def mean_cross_entropy(
    model: PreTrainedModel, blocks: torch.Tensor, batch: int = 32
) -> float:
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
