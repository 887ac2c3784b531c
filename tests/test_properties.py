"""Property-based: malformed configs and calibration files always give our own error."""

from __future__ import annotations

import copy
import json
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mergekit.options import MergeOptions

from mergekit_expert.config import CalibrationConfig, ExpertParameters, parse_plan
from mergekit_expert.errors import ExpertMergingError
from mergekit_expert.pipeline import preflight
from mergekit_expert.records import load_records
from mergekit_expert.testing.cli import invoke, write_config
from mergekit_expert.testing.tiny import expert_config

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
    ),
    max_leaves=8,
)

LOCATIONS = ("top", "calibration", "model", "shared")


def mutate(document: dict, location: str, key: str, value) -> dict:
    document = copy.deepcopy(document)
    if location == "top":
        document[key] = value
    elif location == "calibration":
        document["calibration"][key] = value
    elif location == "model":
        document["models"][0]["parameters"][key] = value
    else:
        document.setdefault("parameters", {})[key] = value
    return document


def validate(document) -> None:
    """Everything that runs before a model is loaded."""
    plan = parse_plan(document)
    preflight(plan, MergeOptions(quiet=True), None)


@SETTINGS
@given(
    location=st.sampled_from(LOCATIONS),
    key=st.one_of(
        st.sampled_from(
            sorted(CalibrationConfig.model_fields)
            + sorted(ExpertParameters.model_fields)
            + ["merge_method", "base_model", "models", "dtype", "coefficients"]
        ),
        st.text(min_size=1, max_size=10),
    ),
    value=values,
)
def test_any_config_mutation_is_valid_or_our_error(tiny, location, key, value):
    document = mutate(expert_config(tiny), location, key, value)
    try:
        validate(document)
    except ExpertMergingError as error:
        assert str(error)


@SETTINGS
@given(document=values)
def test_any_document_is_our_error(document):
    try:
        parse_plan(document)
    except ExpertMergingError as error:
        assert str(error)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10),
    location=st.sampled_from(LOCATIONS),
)
def test_unknown_keys_fail_through_the_cli_without_output(tiny, key, location):
    from hypothesis import assume
    from mergekit.config import MergeConfiguration

    known = set(CalibrationConfig.model_fields) | set(ExpertParameters.model_fields)
    known |= set(MergeConfiguration.model_fields) | {"calibration", "coefficients"}
    assume(key not in known)
    document = mutate(expert_config(tiny), location, key, 1)
    with tempfile.TemporaryDirectory() as root:
        config = write_config(os.path.join(root, "merge.yml"), document)
        out = os.path.join(root, "out")
        result = invoke(config, out)
        assert result.exit_code != 0 and key in result.output
        assert not os.path.exists(out) and not os.path.exists(out + ".partial")


rows = st.one_of(
    values,
    st.fixed_dictionaries({"text": values}),
    st.fixed_dictionaries({"prompt": values}, optional={"response": values}),
    st.fixed_dictionaries({"messages": values}),
    st.fixed_dictionaries(
        {
            "messages": st.lists(
                st.dictionaries(st.sampled_from(["role", "content", "x"]), values)
            )
        }
    ),
)


@SETTINGS
@given(
    lines=st.lists(st.one_of(rows.map(json.dumps), st.text(max_size=20)), max_size=5),
    extension=st.sampled_from([".jsonl", ".json", ".txt"]),
)
def test_any_calibration_file_is_records_or_our_error(lines, extension):
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "data" + extension)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines))
        try:
            records = load_records(path)
        except ExpertMergingError as error:
            assert os.path.basename(path) in str(error)
        else:
            assert records and all(r.text or r.prompt or r.messages for r in records)


@SETTINGS
@given(data=st.binary(max_size=64))
def test_any_bytes_are_records_or_our_error(data):
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "data.jsonl")
        with open(path, "wb") as handle:
            handle.write(data)
        try:
            load_records(path)
        except ExpertMergingError as error:
            assert "data.jsonl" in str(error)
