"""Experts whose vocabulary extends the base's (added chat or special tokens).

An expert fine-tuned with added chat/special tokens has a larger vocabulary
than its base (448 -> 450 rows): mergekit merges its embeddings and lm_head by
token string under ``tokenizer_source`` (``mergekit.tokenizer.build``), and
calibration never touches those tensors. What calibration needs is

- :class:`VocabularyMap`: teacher (expert) token ids -> student (base) token ids
  by token string, to compare their logits on the vocabulary they share and to
  feed the student the ids of a sample the expert's tokenizer produced;
- :func:`compare_vocabularies` / :func:`check_expert_vocabulary`: tell "the base
  vocabulary plus added tokens" from "a different base", before any model loads.

Ids at or past a model's row count (``vocab_size`` in its config) are dropped,
as ``mergekit.tokenizer.build`` drops them: no logit row exists for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from .errors import ExpertMergingError

# A fine-tune may rename a few base tokens in place (Llama 3's reserved special
# tokens become chat markers): that many missing base tokens still count as
# the same vocabulary, edited.
EDITED_TOLERANCE = 0.01
# Median cosine of shared tokens' embedding rows, base vs expert: a fine-tune
# stays near 1 (even the test suite's noisy experts, whose noise outweighs the
# weights, keep 0.37); unrelated models of the same shape are near 0.
SAME_BASE_COSINE = 0.2


def _trim(vocab: Mapping[str, int], size: int | None) -> dict[str, int]:
    return {t: i for t, i in vocab.items() if size is None or i < size}


@dataclass(frozen=True)
class VocabularyMap:
    """Teacher ids -> student ids by token string.

    ``student_ids`` / ``teacher_ids``: the S shared tokens, in ascending student
    id; ``teacher_to_student`` [V_teacher]: student id, or -1 where the student
    has no such token; ``unmapped``: those teacher ids and their strings.
    """

    teacher_to_student: torch.Tensor
    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    student_size: int
    teacher_size: int
    unmapped: Mapping[int, str] = field(default_factory=dict)

    @property
    def shared(self) -> int:
        return int(self.student_ids.numel())

    @property
    def prefix(self) -> bool:
        """Shared tokens are ids 0..S-1 on both sides: selection is a slice."""
        ids = torch.arange(self.shared)
        return torch.equal(self.student_ids, ids) and torch.equal(self.teacher_ids, ids)

    @property
    def identity(self) -> bool:
        """Nothing to map: same tokens at the same ids, same row counts."""
        return self.prefix and self.shared == self.student_size == self.teacher_size

    def teacher_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V_teacher] -> [..., S]: the shared tokens, in student order."""
        if self.prefix:
            return logits[..., : self.shared]
        return logits.index_select(-1, self.teacher_ids.to(logits.device))

    def student_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V_student] -> [..., S], differentiably."""
        if self.prefix:
            return logits[..., : self.shared]
        return logits.index_select(-1, self.student_ids.to(logits.device))

    def teacher_top_k(self, logits: torch.Tensor, k: int):
        """Top-k of the shared tokens: values [..., k] and *student* ids [..., k],
        the form ``objective.logit_loss(student, values, indices=ids)`` takes."""
        values, position = self.teacher_logits(logits).topk(k, dim=-1)
        return values, self.student_ids.to(logits.device)[position]

    def unmapped_in(self, ids: Sequence[int] | torch.Tensor) -> list[str]:
        """Token strings among teacher ``ids`` that the student lacks, in order."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        out_of_range = ids >= self.teacher_size
        mapped = self.teacher_to_student[ids.clamp(0, self.teacher_size - 1)]
        bad = ids[(mapped < 0) | out_of_range].tolist()
        return [self.unmapped.get(i, f"<id {i}>") for i in dict.fromkeys(bad)]

    def to_student_ids(
        self, ids: Sequence[int] | torch.Tensor, where: str = "a sample"
    ) -> torch.Tensor:
        """The student's ids for a teacher-tokenized sequence; raises when a
        token has no student id (the student cannot take it as input)."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        missing = self.unmapped_in(ids)
        if missing:
            raise ExpertMergingError(
                f"{where}: tokenized by its expert, it contains token(s) "
                f"{missing[:5]} that the base vocabulary lacks, so the merged model "
                "cannot take it as input during calibration; calibrate on records "
                "without them (check the expert's chat template, which may emit "
                "them), or drop such records (calibration.added_tokens: skip)"
            )
        return self.teacher_to_student[ids]

    def cut_at_unmapped(self, response_ids: Sequence[int]) -> list[int]:
        """A generated response up to its first token the student lacks (an
        expert's own end-of-turn token, typically): the student cannot emit it."""
        ids = list(response_ids)
        for position, token in enumerate(ids):
            if token >= self.teacher_size or int(self.teacher_to_student[token]) < 0:
                return ids[:position]
        return ids


def vocabulary_map(
    student_vocab: Mapping[str, int],
    teacher_vocab: Mapping[str, int],
    student_size: int | None = None,
    teacher_size: int | None = None,
) -> VocabularyMap:
    """Match tokens by string (as mergekit's tokenizer merge does).

    ``*_vocab``: ``tokenizer.get_vocab()``; ``*_size``: rows of the model's
    embedding / logits (config ``vocab_size``; default: one past the largest id).
    """
    student_size = student_size or max(student_vocab.values()) + 1
    teacher_size = teacher_size or max(teacher_vocab.values()) + 1
    student = _trim(student_vocab, student_size)
    teacher = _trim(teacher_vocab, teacher_size)
    table = torch.full((teacher_size,), -1, dtype=torch.long)
    pairs = sorted((student[t], i) for t, i in teacher.items() if t in student)
    if pairs:
        student_ids, teacher_ids = (
            torch.tensor(c, dtype=torch.long) for c in zip(*pairs)
        )
        table[teacher_ids] = student_ids
    else:
        student_ids = teacher_ids = torch.zeros(0, dtype=torch.long)
    unmapped = {i: t for t, i in teacher.items() if t not in student}
    return VocabularyMap(
        table, student_ids, teacher_ids, student_size, teacher_size, unmapped
    )


@dataclass(frozen=True)
class VocabularyCheck:
    """How an expert's vocabulary relates to the base's.

    ``relation``: ``identical``; ``extended`` (every base token at its base id,
    plus ``added`` tokens); ``edited`` (as extended, but a few base tokens
    renamed or dropped: ``missing``); ``permuted`` (shared tokens at other ids,
    ``moved``); ``different`` (many base tokens missing: another tokenizer).
    """

    relation: str
    added: tuple[str, ...]
    missing: tuple[str, ...]
    moved: int
    shared: int
    base_size: int
    expert_size: int
    embedding_cosine: float | None = None
    # The expert's ids -> the base's, by token string (for the teacher pass).
    mapping: VocabularyMap | None = None

    @property
    def same_rows(self) -> bool:
        return self.relation == "identical"


def compare_vocabularies(
    base_vocab: Mapping[str, int],
    expert_vocab: Mapping[str, int],
    base_size: int | None = None,
    expert_size: int | None = None,
) -> VocabularyCheck:
    base_size = base_size or max(base_vocab.values()) + 1
    expert_size = expert_size or max(expert_vocab.values()) + 1
    base = _trim(base_vocab, base_size)
    expert = _trim(expert_vocab, expert_size)
    shared = [t for t in base if t in expert]
    moved = sum(1 for t in shared if base[t] != expert[t])
    missing = tuple(sorted((t for t in base if t not in expert), key=base.__getitem__))
    added = tuple(sorted((t for t in expert if t not in base), key=expert.__getitem__))
    if not missing and not added and not moved and base_size == expert_size:
        relation = "identical"
    elif moved:
        relation = (
            "permuted" if len(missing) <= EDITED_TOLERANCE * len(base) else "different"
        )
    elif not missing:
        relation = "extended"
    elif len(missing) <= max(1, EDITED_TOLERANCE * len(base)):
        relation = "edited"
    else:
        relation = "different"
    return VocabularyCheck(
        relation, added, missing, moved, len(shared), base_size, expert_size
    )


def embedding_cosine(
    base_embedding: torch.Tensor, expert_embedding: torch.Tensor, vmap: VocabularyMap
) -> float:
    """Median cosine similarity of the shared tokens' rows (student = base);
    the embeddings may hold only their first rows (a sample)."""
    keep = (vmap.student_ids < len(base_embedding)) & (
        vmap.teacher_ids < len(expert_embedding)
    )
    base_rows = base_embedding.float().index_select(0, vmap.student_ids[keep])
    expert_rows = expert_embedding.float().index_select(0, vmap.teacher_ids[keep])
    cosine = torch.nn.functional.cosine_similarity(base_rows, expert_rows, dim=-1)
    return float(cosine.median())


def check_expert_vocabulary(
    name: str,
    base_vocab: Mapping[str, int],
    expert_vocab: Mapping[str, int],
    *,
    base_size: int | None = None,
    expert_size: int | None = None,
    tokenizer_source: object = None,
    base_embedding: torch.Tensor | None = None,
    expert_embedding: torch.Tensor | None = None,
) -> VocabularyCheck:
    """Preflight for one expert; raises ExpertMergingError when it cannot merge.

    Accepted: an identical vocabulary, or the base's plus added tokens (also
    with a few base tokens renamed, or permuted), when the config says how
    mergekit builds the output vocabulary (``tokenizer_source``) and, given the
    embeddings, the shared tokens' rows still agree (a fine-tune of this base).
    """
    check = compare_vocabularies(base_vocab, expert_vocab, base_size, expert_size)
    if check.relation == "identical":
        return check
    if check.relation == "different":
        raise ExpertMergingError(
            f"expert {name} has a different vocabulary from the base "
            f"({len(check.missing)} of the base's {check.shared + len(check.missing)} "
            f"tokens missing, {check.moved} at other ids): expert merging needs "
            "experts fine-tuned from the same base"
        )
    vmap = vocabulary_map(base_vocab, expert_vocab, base_size, expert_size)
    check = replace(check, mapping=vmap)
    if base_embedding is not None and expert_embedding is not None:
        cosine = embedding_cosine(base_embedding, expert_embedding, vmap)
        check = replace(check, embedding_cosine=cosine)
        if cosine < SAME_BASE_COSINE:
            raise ExpertMergingError(
                f"expert {name} shares the base's tokens, but their embeddings "
                f"disagree (median cosine {cosine:.2f} < {SAME_BASE_COSINE}): it is "
                "not a fine-tune of this base"
            )
    if tokenizer_source is None:
        shown = list(check.added[:5]) + (["..."] if len(check.added) > 5 else [])
        raise ExpertMergingError(
            f"expert {name} has {check.expert_size} vocabulary rows, the base "
            f"{check.base_size} (added tokens: {shown}); set tokenizer_source: "
            "union (keep the added tokens) or base (drop them) so mergekit can "
            "align the embeddings"
        )
    return check


def tokenizer_vocabulary(directory: str, trust_remote_code: bool) -> dict[str, int]:
    """Token string -> id of the tokenizer saved in ``directory`` (no weights)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        directory, trust_remote_code=trust_remote_code
    )
    return dict(tokenizer.get_vocab())


def embedding_rows(
    directory: str, vocab_size: int, rows: int = 4096
) -> torch.Tensor | None:
    """The first ``rows`` rows of the input embedding (read as a slice, never
    the whole matrix), or None when no tensor looks like it."""
    import os

    from mergekit.io import ShardedTensorIndex
    from safetensors import safe_open

    index = ShardedTensorIndex.from_disk(directory)
    for name, shard in sorted(index.tensor_paths.items()):
        if "embed" not in name or not shard.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(directory, shard), framework="pt") as handle:
            piece = handle.get_slice(name)
            shape = piece.get_shape()
            if len(shape) == 2 and shape[0] == vocab_size:
                return piece[: min(rows, vocab_size)].float()
    return None


def vocabulary_rows(
    shape: Sequence[int], base_shape: Sequence[int], check: VocabularyCheck
) -> bool:
    """True when a tensor differs from the base's only in its vocabulary rows."""
    return (
        len(shape) == len(base_shape)
        and len(shape) >= 1
        and shape[0] == check.expert_size
        and base_shape[0] == check.base_size
        and tuple(shape[1:]) == tuple(base_shape[1:])
    )
