"""Fixtures shared by the tests, the demo and the benchmarks.

Shipped with the package (like ``torch.testing``) so that ``tests/``,
``examples/demo/`` and ``benchmarks/`` import one copy, with no ``sys.path``
tricks. Nothing here is imported by the merge methods themselves.

- :mod:`.tokenizer`: the one byte-level BPE trainer
- :mod:`.models`: tiny Llama configs, saving, experts = base + seeded noise
- :mod:`.training`: the demo's small training loop and held-out cross-entropy
- :mod:`.corpus`: text that ships with Python, split into domains
- :mod:`.calibration`: calibration files
- :mod:`.tiny`: the test suite's tiny base, experts, LoRA and data
- :mod:`.cli`: write a YAML, run ``mergekit-expert``, read what it wrote
- :mod:`.oracles`: the merged model computed by hand, independently of the code

Each submodule imports what it needs; this ``__init__`` imports none of them.
"""
