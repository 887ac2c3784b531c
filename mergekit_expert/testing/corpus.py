"""Text that ships with every Python install, and its split into domains.

Fixtures must run offline, so instead of downloading data sets they read
what is already on disk: standard-library source (``code``), its docstrings,
the reference prose behind ``help()`` (``prose``) and generated sums
(``arithmetic``). Each domain is split into disjoint train / validation /
test document lists; splits are made per file, per topic and per distinct
problem, so no test document (or a piece of one) is ever seen in training.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

DOMAINS: tuple[str, ...] = ("code", "prose", "arithmetic")

# Stdlib folders that hold tests, vendored tools or near-duplicates; they would
# make the code domain less "library-like" and leak near-copies across splits.
SKIP_DIRS = frozenset(
    {
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
)


@dataclass(frozen=True)
class Domain:
    """One domain: disjoint lists of documents (plain strings) per split."""

    name: str
    train: list[str]
    val: list[str]
    test: list[str]


@dataclass(frozen=True)
class DataConfig:
    """Everything that determines the data; part of a training fingerprint."""

    seed: int = 0
    code_files: int = 160  # seeded subset of stdlib modules
    code_max_chars: int = 12_000  # cap per file so a few huge modules don't dominate
    arith_max_operand: int = 999
    arith_train: int = 20_000
    arith_val: int = 300
    arith_test: int = 500
    val_frac: float = 0.1
    test_frac: float = 0.1


def stdlib_root() -> Path:
    """The standard library of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(skip: frozenset[str] = SKIP_DIRS) -> list[Path]:
    """Every ``.py`` file of the standard library, sorted, outside ``skip`` folders."""
    root = stdlib_root()
    return sorted(
        p
        for p in root.rglob("*.py")
        if not skip.intersection(p.relative_to(root).parts)
    )


def split_documents(docs: list[str], cfg: DataConfig) -> tuple[list, list, list]:
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
    files = stdlib_sources()
    rng = random.Random(cfg.seed)
    rng.shuffle(files)
    texts = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if len(text) >= 500:  # skip empty __init__ files and stubs
            texts.append(text[: cfg.code_max_chars])
        if len(texts) == cfg.code_files:
            break
    return Domain("code", *split_documents(texts, cfg))


def load_prose(cfg: DataConfig) -> Domain:
    """English reference prose from ``pydoc_data.topics``, split by topic."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    random.Random(cfg.seed + 1).shuffle(keys)
    return Domain("prose", *split_documents([topics[k].strip() for k in keys], cfg))


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


def stdlib_docstrings(limit_chars: int) -> list[str]:
    """Docstrings (over 40 characters) of the standard library's modules, classes
    and functions, file by file in sorted order, until ``limit_chars`` is reached."""
    texts: list[str] = []
    total = 0
    for path in stdlib_sources(frozenset({"site-packages", "test"})):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(
                node,
                ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef,
            ):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    texts.append(doc)
                    total += len(doc)
        if total >= limit_chars:
            break
    return texts


def top_level_sources(names: int = 80, max_chars: int = 6000) -> list[str]:
    """The first ``max_chars`` of each ``.py`` file among the first ``names``
    entries (sorted) of the standard library's top folder."""
    root = stdlib_root()
    texts = []
    for name in sorted(p.name for p in root.iterdir())[:names]:
        if name.endswith(".py"):
            with open(root / name, encoding="utf-8", errors="replace") as handle:
                texts.append(handle.read()[:max_chars])
    return texts
