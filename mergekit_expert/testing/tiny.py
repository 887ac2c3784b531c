"""The test suite's tiny setup: a base, two noisy experts, a LoRA adapter, data.

Small enough to build in a second and to calibrate in a few: a 2-block Llama
(hidden 32) with a 320-token BPE trained on :data:`TINY_CORPUS`, experts =
base + N(0, 0.05²) noise (seeds 1 and 2), a rank-4 LoRA adapter on q/v as a
third expert (``base+adapter``), and one calibration file per expert that
holds every record kind (text, prompt + response, prompt only, chat).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .calibration import write_jsonl
from .models import noisy_copy, save_pretrained, tiny_config
from .tokenizer import tiny_tokenizer

TINY_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "12+34=46\n7+8=15\n100+23=123\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "Merging models combines what each expert learned.",
] * 20
VOCAB_SIZE = 320


@dataclass
class TinySetup:
    root: str
    base: str
    experts: list[str]
    lora: str  # "base+adapter" reference
    calibration: list[str]


def build_tiny_setup(root: str) -> TinySetup:
    """Build and save every model and file of the setup under ``root``."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    tokenizer = tiny_tokenizer(TINY_CORPUS, VOCAB_SIZE)
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config(len(tokenizer))).eval()
    base_dir = save_pretrained(base, tokenizer, os.path.join(root, "base"))
    experts = [
        save_pretrained(
            noisy_copy(base, seed), tokenizer, os.path.join(root, f"expert{seed}")
        )
        for seed in (1, 2)
    ]
    lora_dir = os.path.join(root, "adapter")
    peft_model = get_peft_model(
        noisy_copy(base, 0, scale=0.0),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
        ),
    )
    peft_model.save_pretrained(lora_dir)
    corpus = TINY_CORPUS
    calibration = [
        write_jsonl(
            os.path.join(root, "code.jsonl"),
            [
                {"text": corpus[0] * 2},
                {"text": corpus[3]},
                {"prompt": "def add(", "response": "a, b):"},
            ],
        ),
        write_jsonl(
            os.path.join(root, "math.jsonl"),
            [{"prompt": "12+34="}, {"text": corpus[2]}, {"prompt": "7+8="}],
        ),
        write_jsonl(
            os.path.join(root, "chat.jsonl"),
            [
                {
                    "messages": [
                        {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Merging models."},
                    ]
                },
                {"messages": [{"role": "user", "content": "The quick brown"}]},
                {"text": corpus[1]},
            ],
        ),
    ]
    return TinySetup(root, base_dir, experts, f"{base_dir}+{lora_dir}", calibration)


def expert_config(
    tiny: TinySetup, method: str = "expert_merging", calibration=None, lora=True
) -> dict:
    """A merge document of the setup: both experts (the second with task weight
    1.2) and, with ``lora``, the adapter; ``calibration`` overrides the defaults."""
    models = [
        {"model": tiny.experts[0], "parameters": {"calibration": tiny.calibration[0]}},
        {
            "model": tiny.experts[1],
            "parameters": {"calibration": tiny.calibration[1], "task_weight": 1.2},
        },
    ]
    if lora:
        models.append(
            {"model": tiny.lora, "parameters": {"calibration": tiny.calibration[2]}}
        )
    return {
        "merge_method": method,
        "base_model": tiny.base,
        "models": models,
        "dtype": "float32",
        "calibration": {
            "samples_per_expert": 3,
            "epochs": 2,
            "init": 0.3,
            "max_new_tokens": 6,
            **(calibration or {}),
        },
    }
