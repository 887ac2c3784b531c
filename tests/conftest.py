"""Tiny real models, saved with save_pretrained, shared by the test session."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: never try the network

import mergekit_expert  # noqa: E402, F401  (registers the methods)

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "12+34=46\n7+8=15\n100+23=123\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "Merging models combines what each expert learned.",
] * 20


def build_tokenizer(directory: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    wrapped.save_pretrained(directory)
    return wrapped


def tiny_config(vocab_size: int, layers: int = 2, hidden: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def save_model(model, tokenizer, directory: str) -> str:
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def perturbed(base, seed: int, scale: float = 0.05):
    """A copy of ``base`` with every tensor moved by seeded noise (an "expert")."""
    import copy

    expert = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in expert.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return expert


def write_jsonl(path: str, rows) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


@dataclass
class TinySetup:
    root: str
    base: str
    experts: list[str]
    lora: str  # "base+adapter" reference
    calibration: list[str]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinySetup:
    from transformers import LlamaForCausalLM

    root = str(tmp_path_factory.mktemp("tiny"))
    tokenizer = build_tokenizer(os.path.join(root, "tokenizer"))
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config(len(tokenizer))).eval()
    base_dir = save_model(base, tokenizer, os.path.join(root, "base"))
    experts = [
        save_model(
            perturbed(base, seed), tokenizer, os.path.join(root, f"expert{seed}")
        )
        for seed in (1, 2)
    ]
    lora_dir = os.path.join(root, "adapter")
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        perturbed(base, 0, scale=0.0),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
        ),
    )
    peft_model.save_pretrained(lora_dir)
    calibration = [
        write_jsonl(
            os.path.join(root, "code.jsonl"),
            [
                {"text": CORPUS[0] * 2},
                {"text": CORPUS[3]},
                {"prompt": "def add(", "response": "a, b):"},
            ],
        ),
        write_jsonl(
            os.path.join(root, "math.jsonl"),
            [{"prompt": "12+34="}, {"text": CORPUS[2]}, {"prompt": "7+8="}],
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
                {"text": CORPUS[1]},
            ],
        ),
    ]
    return TinySetup(root, base_dir, experts, f"{base_dir}+{lora_dir}", calibration)


def expert_config(
    tiny: TinySetup, method: str = "expert_merging", calibration=None, lora=True
) -> dict:
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


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail loudly if anything loads model weights."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr(
        transformers.PreTrainedModel, "from_pretrained", classmethod(refuse)
    )
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
