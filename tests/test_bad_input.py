"""Bad input fails before any model is loaded, names the problem, leaves no OUT."""

from __future__ import annotations

import os

import transformers

from mergekit_expert.testing.calibration import write_jsonl
from mergekit_expert.testing.cli import invoke, run_failing, write_config
from mergekit_expert.testing.models import save_pretrained, tiny_config
from mergekit_expert.testing.tiny import TINY_CORPUS, VOCAB_SIZE, expert_config
from mergekit_expert.testing.tokenizer import tiny_tokenizer


def test_misspelled_calibration_key(tiny, tmp_path, no_model_loads):
    document = expert_config(tiny)
    document["calibration"]["reg_wieght"] = 0.5
    output = run_failing(tmp_path, document)
    assert "reg_wieght" in output and "did you mean 'reg_weight'" in output


def test_misspelled_model_parameter_and_top_level_key(tiny, tmp_path, no_model_loads):
    document = expert_config(tiny)
    document["models"][0]["parameters"]["task_weigth"] = 2.0
    output = run_failing(tmp_path, document)
    assert "task_weigth" in output and "did you mean 'task_weight'" in output
    document = expert_config(tiny)
    document["calibraton"] = document.pop("calibration")
    output = run_failing(tmp_path, document)
    assert "calibraton" in output and "did you mean 'calibration'" in output


def test_wrong_value_type(tiny, tmp_path, no_model_loads):
    document = expert_config(tiny)
    document["calibration"]["epochs"] = "many"
    output = run_failing(tmp_path, document)
    assert "calibration.epochs" in output


def test_missing_calibration_file(tiny, tmp_path, no_model_loads):
    document = expert_config(tiny)
    document["models"][1]["parameters"]["calibration"] = str(tmp_path / "nope.jsonl")
    output = run_failing(tmp_path, document)
    assert "nope.jsonl" in output and "does not exist" in output


def test_expert_without_calibration_data(tiny, tmp_path, no_model_loads):
    document = expert_config(tiny)
    del document["models"][0]["parameters"]["calibration"]
    output = run_failing(tmp_path, document)
    assert "no calibration data" in output and tiny.experts[0] in output


def test_no_base_model(tiny, tmp_path, no_model_loads):
    document = expert_config(tiny)
    del document["base_model"]
    output = run_failing(tmp_path, document)
    assert "base_model" in output


def test_empty_calibration_file(tiny, tmp_path, no_model_loads):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    document = expert_config(tiny)
    document["models"][0]["parameters"]["calibration"] = str(empty)
    output = run_failing(tmp_path, document)
    assert "empty.jsonl" in output and "no records" in output


def test_invalid_json_line_and_fields(tiny, tmp_path, no_model_loads):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    document = expert_config(tiny)
    document["models"][0]["parameters"]["calibration"] = str(bad)
    assert "bad.jsonl:2" in run_failing(tmp_path, document)
    wrong = write_jsonl(str(tmp_path / "wrong.jsonl"), [{"txt": "hello"}] * 3)
    document["models"][0]["parameters"]["calibration"] = wrong
    output = run_failing(tmp_path, document)
    assert "wrong.jsonl:1" in output and "'text'" in output


def test_too_few_records(tiny, tmp_path, no_model_loads):
    document = expert_config(tiny, calibration={"samples_per_expert": 10})
    output = run_failing(tmp_path, document)
    assert "samples_per_expert" in output and "allow_fewer_samples" in output


def test_experts_of_different_shapes(tiny, tmp_path, no_model_loads):
    tokenizer = tiny_tokenizer(TINY_CORPUS, VOCAB_SIZE)
    monkey = transformers.LlamaForCausalLM._from_config  # construction, not loading
    wide = monkey(tiny_config(len(tokenizer), hidden=48))
    other = save_pretrained(wide, tokenizer, str(tmp_path / "wide"))
    document = expert_config(tiny)
    document["models"][1]["model"] = other
    output = run_failing(tmp_path, document)
    assert "shape" in output and "wide" in output


def test_bad_artifact(tiny, tmp_path, no_model_loads):
    document = expert_config(tiny)
    output = run_failing(
        tmp_path, document, "--coefficients", str(tmp_path / "none.safetensors")
    )
    assert "none.safetensors" in output and "does not exist" in output


def test_existing_output_is_kept_on_failure(tiny, tmp_path, no_model_loads):
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "keep.txt").write_text("mine")
    document = expert_config(tiny)
    document["calibration"]["lrr"] = 1
    result = invoke(write_config(tmp_path / "merge.yml", document), out)
    assert result.exit_code != 0 and "did you mean 'lr'" in result.output
    assert (out / "keep.txt").read_text() == "mine"


def test_vocabulary_mismatch(tiny, tmp_path, no_model_loads):
    import json
    import shutil

    other = tmp_path / "other_vocab"
    shutil.copytree(tiny.experts[0], other)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] += 7
    (other / "config.json").write_text(json.dumps(config))
    document = expert_config(tiny)
    document["models"][0]["model"] = str(other)
    output = run_failing(tmp_path, document)
    # Without tokenizer_source mergekit could not align a changed vocabulary.
    assert "has 327 vocabulary rows, the base 320" in output
    assert "other_vocab" in output and "tokenizer_source" in output


def test_expert_tensor_missing_from_base(tiny, tmp_path, no_model_loads):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    extra = tmp_path / "extra"
    shutil.copytree(tiny.experts[0], extra)
    tensors = load_file(str(extra / "model.safetensors"))
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)
    save_file(tensors, str(extra / "model.safetensors"), metadata={"format": "pt"})
    document = expert_config(tiny)
    document["models"][0]["model"] = str(extra)
    output = run_failing(tmp_path, document)
    assert (
        "model.layers.0.mlp.extra_proj.weight" in output
        and "base model lacks" in output
    )


def test_hidden_layer_out_of_range(tiny, tmp_path, no_model_loads):
    document = expert_config(tiny)
    document["calibration"]["hidden_layers"] = [-4]  # 2 blocks: -3..-1 or 0..2
    output = run_failing(tmp_path, document)
    assert "hidden_layers contains -4" in output
    assert "0..2" in output and "-3..-1" in output
