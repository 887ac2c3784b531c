"""Tiny real models, saved with save_pretrained, shared by the test session.

The models, files and helpers themselves live in ``mergekit_expert.testing``
(shared with the demo and the benchmarks); this file only makes fixtures of them.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: never try the network
# The shared helpers assert; show their failures as pytest shows a test's own.
pytest.register_assert_rewrite("mergekit_expert.testing")

import mergekit_expert  # noqa: E402, F401  (registers the methods)
from mergekit_expert.testing.tiny import TinySetup, build_tiny_setup  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinySetup:
    return build_tiny_setup(str(tmp_path_factory.mktemp("tiny")))


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
