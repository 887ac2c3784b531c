"""Three small text domains that ship with every Python install.

The demo must run offline, so instead of downloading data sets we use text
that is already on disk: standard-library source (``code``), the reference
prose behind ``help()`` (``prose``) and generated sums (``arithmetic``).
Each domain is split into disjoint train / validation / test document lists;
splits are made per file, per topic and per distinct problem, so no test
document (or a piece of one) is ever seen in training.
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

DOMAINS: tuple[str, ...] = ("code", "prose", "arithmetic")

# Stdlib folders that hold tests, vendored tools or near-duplicates; they would
# make the code domain less "library-like" and leak near-copies across splits.
_SKIP_DIRS = {
    "site-packages",
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "__pycache__",
    "turtledemo",
    "ensurepip",
    "pydoc_data",
}


@dataclass(frozen=True)
class Domain:
    """One domain: disjoint lists of documents (plain strings) per split."""

    name: str
    train: list[str]
    val: list[str]
    test: list[str]


@dataclass(frozen=True)
class DataConfig:
    """Everything that determines the data; part of the training fingerprint."""

    seed: int = 0
    code_files: int = 160  # seeded subset of stdlib modules
    code_max_chars: int = 12_000  # cap per file so a few huge modules don't dominate
    arith_max_operand: int = 999
    arith_train: int = 20_000
    arith_val: int = 300
    arith_test: int = 500
    val_frac: float = 0.1
    test_frac: float = 0.1


def _split(docs: list[str], cfg: DataConfig) -> tuple[list, list, list]:
    """Split shuffled documents into train / val / test by share of characters.

    Splitting by count would let one long document (a few pydoc topics are
    huge) make a held-out split several times larger than intended and starve
    the training set of the smallest domain.
    """
    total = sum(map(len, docs))
    held_out: list[list[str]] = [[], []]  # test, val
    rest = iter(docs)
    for split, frac in zip(held_out, (cfg.test_frac, cfg.val_frac)):
        while sum(map(len, split)) < frac * total:
            split.append(next(rest))
    test, val = held_out
    return list(rest), val, test


def load_code(cfg: DataConfig) -> Domain:
    """Python source of a seeded subset of stdlib modules, split by file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not _SKIP_DIRS.intersection(p.relative_to(root).parts)
    )
    rng = random.Random(cfg.seed)
    rng.shuffle(files)
    texts = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if len(text) >= 500:  # skip empty __init__ files and stubs
            texts.append(text[: cfg.code_max_chars])
        if len(texts) == cfg.code_files:
            break
    return Domain("code", *_split(texts, cfg))


def load_prose(cfg: DataConfig) -> Domain:
    """English reference prose from ``pydoc_data.topics``, split by topic."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    random.Random(cfg.seed + 1).shuffle(keys)
    return Domain("prose", *_split([topics[k].strip() for k in keys], cfg))


def arithmetic_problem(a: int, b: int) -> str:
    """Render one sum in the format the experts are trained on."""
    return f"{a}+{b}={a + b}"


def arithmetic_pairs(cfg: DataConfig) -> tuple[list, list, list]:
    """Distinct (a, b) operand pairs per split; a test pair never appears in train."""
    rng = random.Random(cfg.seed + 2)
    n = cfg.arith_train + cfg.arith_val + cfg.arith_test
    seen: set[tuple[int, int]] = set()
    pairs: list[tuple[int, int]] = []
    while len(pairs) < n:
        pair = (
            rng.randint(0, cfg.arith_max_operand),
            rng.randint(0, cfg.arith_max_operand),
        )
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    val = pairs[: cfg.arith_val]
    test = pairs[cfg.arith_val : cfg.arith_val + cfg.arith_test]
    return pairs[cfg.arith_val + cfg.arith_test :], val, test


def load_arithmetic(cfg: DataConfig) -> Domain:
    """Generated sums, one problem per document."""
    splits = arithmetic_pairs(cfg)
    return Domain(
        "arithmetic", *([arithmetic_problem(a, b) for a, b in s] for s in splits)
    )


def load_domains(cfg: DataConfig) -> dict[str, Domain]:
    """All three domains, keyed by name, in the order of ``DOMAINS``."""
    return {
        "code": load_code(cfg),
        "prose": load_prose(cfg),
        "arithmetic": load_arithmetic(cfg),
    }
