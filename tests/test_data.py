"""Calibration records: every supported source, rendering and alignment masks."""

import json

import pytest
import torch

from mergekit_expert.config import AUTO_SAMPLES, CalibrationConfig
from mergekit_expert.data import epoch_order, make_sample, render
from mergekit_expert.errors import ExpertMergingError
from mergekit_expert.records import CalibrationRecord, choose_records, load_records
from mergekit_expert.testing.calibration import write_jsonl

ROWS = [
    {"text": "plain text"},
    {"prompt": "2+2=", "response": "4"},
    {"prompt": "only a prompt"},
    {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]
    },
]


def expected_kinds(records):
    return [
        (r.text, r.prompt, r.response, r.messages, r.needs_response) for r in records
    ]


KINDS = [
    ("plain text", None, None, None, False),
    (None, "2+2=", "4", None, False),
    (None, "only a prompt", None, None, True),
    (None, None, None, (("user", "hi"), ("assistant", "hello")), False),
]


def test_every_source_format(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", ROWS)
    as_json = tmp_path / "a.json"
    as_json.write_text(json.dumps(ROWS))
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = [
        {
            "text": r.get("text"),
            "prompt": r.get("prompt"),
            "response": r.get("response"),
        }
        for r in ROWS[:3]
    ]
    pq.write_table(pa.Table.from_pylist(flat), tmp_path / "a.parquet")
    datasets.Dataset.from_list(flat).save_to_disk(str(tmp_path / "ds"))
    txt = tmp_path / "a.txt"
    txt.write_text("first line\n\nsecond line\n")

    assert expected_kinds(load_records(str(jsonl))) == KINDS
    assert expected_kinds(load_records(str(as_json))) == KINDS
    assert expected_kinds(load_records(str(tmp_path / "a.parquet"))) == KINDS[:3]
    assert expected_kinds(load_records(str(tmp_path / "ds"))) == KINDS[:3]
    assert [r.text for r in load_records(str(txt))] == ["first line", "second line"]


def test_non_utf8_and_unknown_extension(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(ExpertMergingError, match="bad.txt: not UTF-8"):
        load_records(str(bad))
    other = tmp_path / "data.csv"
    other.write_text("x\n")
    with pytest.raises(ExpertMergingError, match="unsupported calibration file type"):
        load_records(str(other))


def test_choose_records_is_seeded_and_checked():
    records = [CalibrationRecord(f"f:{i}", text=str(i)) for i in range(20)]
    first = choose_records(records, 5, 0, allow_fewer=False, source="f")
    assert first == choose_records(records, 5, 0, allow_fewer=False, source="f")
    assert first != choose_records(records, 5, 1, allow_fewer=False, source="f")
    assert len(set(r.where for r in first)) == 5
    with pytest.raises(
        ExpertMergingError, match="has 20 records but samples_per_expert is 25"
    ):
        choose_records(records, 25, 0, allow_fewer=False, source="f")
    assert len(choose_records(records, 25, 0, allow_fewer=True, source="f")) == 20


def test_epoch_order_is_round_robin():
    import random

    order = epoch_order([3, 1, 2], random.Random(0))
    assert [k for k, _ in order] == [0, 1, 2, 0, 2, 0]
    assert sorted(i for k, i in order if k == 0) == [0, 1, 2]


def test_render_with_and_without_chat_template(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny.base)
    assert not tokenizer.chat_template
    prompt, response = render(
        CalibrationRecord("x", prompt="def add(", response="a, b):"), tokenizer
    )
    assert (
        tokenizer.decode(prompt + response, skip_special_tokens=True)
        == "def add(a, b):"
    )
    prompt, response = render(CalibrationRecord("x", prompt="7+8="), tokenizer)
    assert (
        response is None
        and tokenizer.decode(prompt, skip_special_tokens=True) == "7+8="
    )

    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    record = CalibrationRecord("x", messages=(("user", "hi"), ("assistant", "hello")))
    prompt, response = render(record, tokenizer)
    assert tokenizer.decode(prompt) == "<|user|>hi\n<|assistant|>"
    assert tokenizer.decode(response) == "hello\n"

    sample = make_sample(0, record, prompt, response, max_length=512)
    mask = sample.align_mask("response")
    assert mask.sum() == len(response)
    assert mask[len(prompt) - 1] and not mask[len(prompt) - 2] and not mask[-1]
    assert sample.align_mask("all") is None
    short = make_sample(0, record, prompt, response, max_length=4)
    assert short.truncated and len(short.input_ids) == 4
    assert torch.equal(short.input_ids, torch.tensor(prompt + response)[:4])


def test_samples_per_expert_auto_takes_up_to_twenty_and_never_fails():
    """The default draws AUTO_SAMPLES records (the same seeded ones as asking
    for that number), or every record of a smaller file without an error."""
    assert CalibrationConfig().samples_per_expert == "auto" and AUTO_SAMPLES == 20
    many = [CalibrationRecord(f"f:{i}", text=str(i)) for i in range(30)]
    chosen = choose_records(many, "auto", 3, allow_fewer=False, source="f")
    assert chosen == choose_records(many, 20, 3, allow_fewer=False, source="f")
    assert len({r.where for r in chosen}) == 20
    few = many[:8]
    assert choose_records(few, "auto", 3, allow_fewer=False, source="f") == few
