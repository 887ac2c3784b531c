"""Experts that added tokens: calibrated on the shared vocabulary, written by
mergekit under ``tokenizer_source``; another base is still refused."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from mergekit_expert.testing.calibration import write_jsonl
from mergekit_expert.testing.cli import run_document, run_failing
from mergekit_expert.testing.models import save_pretrained, tiny_config
from mergekit_expert.testing.oracles import hand_merge, load_tensors
from mergekit_expert.testing.tiny import expert_config
from mergekit_expert.testing.tokenizer import tiny_tokenizer

ADDED = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def chat_expert(tiny, tmp_path_factory):
    """expert1 after a fine-tune that added two chat tokens: 320 -> 322 rows."""
    folder = str(tmp_path_factory.mktemp("chat_expert"))
    tokenizer = AutoTokenizer.from_pretrained(tiny.experts[0])
    tokenizer.add_special_tokens({"additional_special_tokens": ADDED})
    model = LlamaForCausalLM.from_pretrained(tiny.experts[0], dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():  # the new rows, as training would have left them
        generator = torch.Generator().manual_seed(7)
        for matrix in (model.model.embed_tokens.weight, model.lm_head.weight):
            matrix[-2:] = torch.randn(2, matrix.shape[1], generator=generator) * 0.1
    return save_pretrained(model, tokenizer, folder)


def document(tiny, chat_expert, **extra) -> dict:
    doc = expert_config(
        tiny, lora=False, calibration={"epochs": 2, "reg_weight": 0.0, "lr": 0.05}
    )
    doc["models"][0]["model"] = chat_expert
    doc.update(extra)
    return doc


@pytest.mark.parametrize("source", ["union", "base"])
def test_expert_with_added_tokens(tiny, chat_expert, tmp_path, source):
    run = run_document(tmp_path, document(tiny, chat_expert, tokenizer_source=source))
    report, coefficients, merged = run.report, run.coefficients, run.model
    # Calibration happened, on the shared vocabulary (finite, lower, moved).
    stage1 = report["stage1"]
    assert stage1["kept_epoch"] == len(stage1["objective"]) - 1 > 0
    assert stage1["objective"][-1] < stage1["objective"][0]
    assert all(torch.isfinite(torch.tensor(stage1["objective"])))
    assert any((a - 0.3).abs().max() > 1e-3 for a in coefficients.values())
    # Calibrated weights: base + sum_k alpha_k tau_k, by hand.
    base = load_tensors(tiny.base)
    experts = [load_tensors(chat_expert), load_tensors(tiny.experts[1])]
    for name, alpha in coefficients.items():
        expected = hand_merge(base[name], [e[name] for e in experts], alpha)
        torch.testing.assert_close(
            merged[name].double(), expected, rtol=1e-5, atol=1e-6
        )
    # The vocabulary as mergekit builds it: union keeps the added rows (from the
    # expert that has them), base drops them; the base's rows stay the base's.
    rows = 322 if source == "union" else 320
    config = json.load(open(run.out / "config.json"))
    assert config["vocab_size"] == rows
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[name].shape[0] == rows
        assert torch.equal(merged[name][:320], base[name]), name
        if source == "union":
            assert torch.equal(merged[name][320:], experts[0][name][320:]), name
    tokenizer = AutoTokenizer.from_pretrained(run.out)
    assert all(
        (token in tokenizer.get_vocab()) == (source == "union") for token in ADDED
    )


def test_added_tokens_need_tokenizer_source(
    tiny, chat_expert, tmp_path, no_model_loads
):
    output = run_failing(tmp_path, document(tiny, chat_expert))
    assert "added tokens: ['<|im_start|>', '<|im_end|>']" in output
    assert "tokenizer_source: union" in output


def test_a_record_with_an_added_token_is_refused(tiny, chat_expert, tmp_path):
    data = write_jsonl(
        str(tmp_path / "chat.jsonl"),
        [{"text": "<|im_start|>user Hi<|im_end|>"}, {"text": "def add(a, b):"}],
    )
    doc = document(tiny, chat_expert, tokenizer_source="union")
    doc["models"][0]["parameters"]["calibration"] = data
    doc["calibration"]["samples_per_expert"] = 2
    output = run_failing(tmp_path, doc)
    assert "chat.jsonl:1" in output and "<|im_start|>" in output
    assert "the base vocabulary lacks" in output


def test_another_base_is_refused(tiny, tmp_path, no_model_loads):
    corpus = ["zebra quantum violin " * 3, "lorem ipsum dolor sit amet " * 2] * 30
    tokenizer = tiny_tokenizer(corpus, 330)
    model = LlamaForCausalLM(tiny_config(len(tokenizer)))
    other = save_pretrained(model, tokenizer, str(tmp_path / "other_base_expert"))
    doc = expert_config(tiny, lora=False, calibration={"epochs": 1})
    doc["models"][0]["model"] = other
    doc["tokenizer_source"] = "union"
    output = run_failing(tmp_path, doc)
    assert "other_base_expert" in output
    assert "different vocabulary from the base" in output
    assert os.path.isdir(other)
