"""Vision-language experts: a tiny Qwen2-VL with a processor built here, offline."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit_expert.records import load_records
from mergekit_expert.testing.calibration import write_jsonl
from mergekit_expert.testing.cli import run_document, run_failing
from mergekit_expert.testing.models import noisy_copy
from mergekit_expert.testing.oracles import hand_merge
from mergekit_expert.testing.tokenizer import train_bpe

SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LM_PROJECTIONS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
TEXT_LAYERS = 2


def build_tokenizer():
    from transformers import Qwen2Tokenizer

    corpus = ["Describe the image. A red square on a blue background."] * 20
    corpus += ["user assistant What colour is it? Red. Blue. Green."] * 20
    bpe = train_bpe(corpus, 300, SPECIAL)
    state = json.loads(bpe.to_str())["model"]
    return Qwen2Tokenizer(
        vocab=state["vocab"],
        merges=[tuple(m) for m in state["merges"]],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens=SPECIAL[1:],
    )


def build_model(tokenizer, seed: int, kind: str = "qwen2_vl"):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    ids = tokenizer.convert_tokens_to_ids
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],  # sums to head_dim / 2
        },
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
    }
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,
        "num_heads": 4,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    if kind == "qwen2_5_vl":
        config_class, model_class = (
            Qwen2_5_VLConfig,
            Qwen2_5_VLForConditionalGeneration,
        )
        vision = {
            "depth": 2,
            "hidden_size": 32,
            "out_hidden_size": 64,
            "intermediate_size": 64,
            "num_heads": 4,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        }
    config = config_class(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=False,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    return model_class(config).eval()


def save_with_processor(model, tokenizer, directory: str, kind: str) -> str:
    """The model plus its processor's files, as a hub repository holds them."""
    from transformers import Qwen2VLImageProcessorPil

    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    images = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2
    )
    images.save_pretrained(directory)
    with open(os.path.join(directory, "chat_template.jinja"), "w") as handle:
        handle.write(CHAT_TEMPLATE)
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        path = os.path.join(directory, name)
        config = json.load(open(path))
        config["processor_class"] = (
            "Qwen2_5_VLProcessor" if kind == "qwen2_5_vl" else "Qwen2VLProcessor"
        )
        json.dump(config, open(path, "w"), indent=2)
    return directory


@dataclass
class TinyVL:
    root: str
    base: str
    experts: list[str]
    data: list[str]


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory) -> TinyVL:
    return make_setup(tmp_path_factory.mktemp("vl"), "qwen2_vl")


@pytest.fixture(scope="module")
def tiny_vl_25(tmp_path_factory) -> TinyVL:
    return make_setup(tmp_path_factory.mktemp("vl25"), "qwen2_5_vl")


def make_setup(root, kind: str) -> TinyVL:
    """A base and two experts (noise on every weight, vision included), with data."""
    from PIL import Image

    tokenizer = build_tokenizer()
    base = build_model(tokenizer, seed=0, kind=kind)
    base_dir = save_with_processor(base, tokenizer, str(root / "base"), kind)
    experts = [  # noise on every weight, the vision tower's included
        save_with_processor(
            noisy_copy(base, 100 + k, 0.05), tokenizer, str(root / f"e{k}"), kind
        )
        for k in range(2)
    ]
    images = root / "images"
    images.mkdir()
    for i, colour in enumerate([(220, 30, 30), (30, 30, 220), (30, 200, 30)]):
        Image.new("RGB", (56, 56), colour).save(images / f"img{i}.png")
    # Expert 0: prompt + image, no response (the expert generates it).
    data0 = write_jsonl(
        str(root / "vqa.jsonl"),
        [
            {"image": "images/img0.png", "prompt": "Describe the image."},
            {"image": ["images/img1.png"], "prompt": "What colour is it?"},
        ],
    )
    # Expert 1: chat messages with image parts and answers.
    data1 = write_jsonl(
        str(root / "chat.jsonl"),
        [
            {
                "image": "images/img2.png",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image"},
                            {"type": "text", "text": "What colour is it?"},
                        ],
                    },
                    {"role": "assistant", "content": "Green."},
                ],
            },
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": "images/img0.png"},
                            {"type": "text", "text": "Describe the image."},
                        ],
                    },
                    {"role": "assistant", "content": "A red square."},
                ]
            },
        ],
    )
    return TinyVL(str(root), base_dir, experts, [data0, data1])


def vl_config(setup: TinyVL, method: str, **calibration) -> dict:
    return {
        "merge_method": method,
        "base_model": setup.base,
        "models": [
            {"model": e, "parameters": {"calibration": d}}
            for e, d in zip(setup.experts, setup.data)
        ],
        "dtype": "float32",
        "calibration": {
            "samples_per_expert": 2,
            "epochs": 2,
            "accumulation": 2,
            "max_new_tokens": 4,
            "init": 0.3,
            **calibration,
        },
    }


@pytest.mark.parametrize(
    "setup, method",
    [
        ("tiny_vl", "expert_merging"),
        ("tiny_vl", "expert_merging_pp"),
        ("tiny_vl_25", "expert_merging"),
    ],
)
def test_vl_end_to_end(request, tmp_path, setup, method):
    from transformers import AutoModelForImageTextToText

    tiny_vl = request.getfixturevalue(setup)
    # reg_weight 0.05: at 0.8 these noise experts keep the start (the optimum).
    run = run_document(tmp_path, vl_config(tiny_vl, method, reg_weight=0.05))
    out = str(run.out)
    alphas = run.coefficients
    # Training happened: the kept objective is below its start, alphas moved.
    report = run.report
    stage = report.get("stage2") or report["stage1"]
    assert stage["objective"][stage["kept_epoch"]] < report["stage1"]["objective"][0]
    assert report["outcome"]["moved"]
    # By default only the language model's projections are calibrated; the
    # other weights (vision tower, projector, embeddings, norms, biases) are
    # merged at the initial alpha.
    expected_names = {
        f"model.layers.{i}.{p}.weight"
        for i in range(TEXT_LAYERS)
        for p in LM_PROJECTIONS
    }
    at_init = set(run.report["at_init"])
    assert set(alphas) - at_init == expected_names
    assert any(name.startswith("visual.") for name in at_init)
    init = run.report["init"]
    for name in at_init:
        assert alphas[name].reshape(-1).tolist() == pytest.approx(init, abs=1e-7)

    base = load_file(os.path.join(tiny_vl.base, "model.safetensors"))
    experts = [load_file(os.path.join(e, "model.safetensors")) for e in tiny_vl.experts]
    merged = load_file(os.path.join(out, "model.safetensors"))
    assert set(merged) == set(base)
    for name, tensor in merged.items():
        if name in alphas:
            expected = hand_merge(base[name], [e[name] for e in experts], alphas[name])
            torch.testing.assert_close(tensor.double(), expected, rtol=1e-5, atol=1e-6)
        else:  # no coefficients (e.g. an integer buffer): the base's
            torch.testing.assert_close(tensor, base[name], rtol=0, atol=0)
    assert any(name.startswith("visual.") for name in merged)
    assert not torch.equal(
        merged["model.layers.0.mlp.up_proj.weight"],
        base["model.layers.0.mlp.up_proj.weight"],
    )

    # transformers loads the written model; its in-memory names differ.
    model = AutoModelForImageTextToText.from_pretrained(out)
    torch.testing.assert_close(
        model.model.language_model.layers[1].self_attn.v_proj.weight,
        merged["model.layers.1.self_attn.v_proj.weight"],
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        model.model.visual.blocks[0].attn.qkv.weight,
        merged["visual.blocks.0.attn.qkv.weight"],
        rtol=0,
        atol=0,
    )
    # The processor travels with the model.
    for name in ("preprocessor_config.json", "chat_template.jinja", "tokenizer.json"):
        assert os.path.exists(os.path.join(out, name)), name

    report = run.report
    labels = report["pseudo_labels"]
    assert [p["expert"] for p in labels] == [0, 0]  # expert 0's prompt-only records
    assert report["samples_per_expert"] == [2, 2]


def test_image_records_are_read_relative_to_their_file(tiny_vl):
    records = load_records(tiny_vl.data[1])
    images = os.path.join(tiny_vl.root, "images")
    assert records[0].images == (os.path.join(images, "img2.png"),)
    assert records[1].images == (os.path.join(images, "img0.png"),)
    user = records[0].messages[0][1]
    assert user == (
        ("image", os.path.join(images, "img2.png")),
        ("text", "What colour is it?"),
    )
    assert records[0].response is None and not records[0].needs_response


@pytest.mark.parametrize("problem", ["missing", "unreadable"])
def test_bad_image_fails_before_any_model_loads(
    tiny_vl,
    tmp_path,
    no_model_loads,
    problem,
):
    if problem == "unreadable":
        (tmp_path / "broken.png").write_text("this is not a PNG")
    data = write_jsonl(
        str(tmp_path / "bad.jsonl"),
        [
            {"image": os.path.join(tiny_vl.root, "images", "img0.png"), "prompt": "A?"},
            {"image": "broken.png", "prompt": "B?"},
        ],
    )
    document = vl_config(tiny_vl, "expert_merging")
    document["models"][0]["parameters"]["calibration"] = data
    output = run_failing(tmp_path, document)
    assert f"{data}:2" in output and "broken.png" in output
    reason = "does not exist" if problem == "missing" else "cannot be read as an image"
    assert reason in output


def test_images_reach_the_model(tiny_vl, tmp_path):
    """Rendering matches the processor called by hand, and the pixels matter."""
    from PIL import Image
    from transformers import Qwen2VLForConditionalGeneration

    from mergekit_expert.data import make_sample, render_multimodal
    from mergekit_expert.multimodal import load_processor
    from mergekit_expert.placement import Placement
    from mergekit_expert.teacher import score

    processor = load_processor(tiny_vl.base)
    record = load_records(tiny_vl.data[1])[1]  # red image, with an answer
    rendered = render_multimodal(record, processor)
    sample = make_sample(
        0,
        record,
        rendered.prompt_ids,
        rendered.response_ids,
        512,
        rendered.inputs,
        rendered.token_inputs,
    )
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "Describe the image."},
            ],
        },
        {"role": "assistant", "content": "A red square."},
    ]
    text = processor.apply_chat_template(conversation, tokenize=False)
    red = Image.open(os.path.join(tiny_vl.root, "images", "img0.png")).convert("RGB")
    by_hand = processor(text=[text], images=[red], return_tensors="pt")
    assert sample.input_ids.tolist() == by_hand["input_ids"][0].tolist()
    grid = by_hand["image_grid_thw"]
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert sample.input_ids.tolist().count(pad) == int(grid.prod()) // 4
    torch.testing.assert_close(sample.inputs["pixel_values"], by_hand["pixel_values"])
    assert sample.response_start == len(rendered.prompt_ids) > 0

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_vl.base).eval()
    target = score(model, sample, [1], Placement())
    with torch.no_grad():
        reference = model(**by_hand, output_hidden_states=True)
    torch.testing.assert_close(target.logits, reference.logits[0])
    torch.testing.assert_close(target.hidden[0], reference.hidden_states[1][0])
    blue = Image.new("RGB", (56, 56), (30, 30, 220))
    with torch.no_grad():
        other = model(**processor(text=[text], images=[blue], return_tensors="pt"))
    assert not torch.allclose(other.logits[0], target.logits, atol=1e-4)

    # A cache on disk (resumed runs) gives the sample back with its pixels.
    from mergekit_expert.teacher import TeacherCache

    cache = TeacherCache(str(tmp_path / "teacher"))
    cache.experts = [0]
    cache.add(0, sample, target)
    cache.finish()
    again = TeacherCache.reopen(str(tmp_path / "teacher")).samples[0]
    assert again.input_ids.tolist() == sample.input_ids.tolist()
    assert set(again.inputs) == set(sample.inputs) and again.inputs
    for key, value in sample.inputs.items():
        torch.testing.assert_close(again.inputs[key], value, rtol=0, atol=0)
    for key, value in sample.token_inputs.items():
        torch.testing.assert_close(again.token_inputs[key], value, rtol=0, atol=0)


def test_example_config_is_a_valid_plan():
    from mergekit_expert.config import parse_plan

    path = os.path.join(
        os.path.dirname(__file__), "..", "examples", "qwen2vl-five-experts.yml"
    )
    plan = parse_plan(yaml.safe_load(open(path)))
    assert plan.method == "expert_merging_pp"
    assert len(plan.experts) == 5
    assert all(e.calibration.endswith(".jsonl") for e in plan.experts)
