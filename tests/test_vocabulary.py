"""Experts with added tokens: the teacher -> student id map and the preflight check."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from mergekit_expert.errors import ExpertMergingError
from mergekit_expert.objective import logit_loss
from mergekit_expert.testing.tiny import TINY_CORPUS as CORPUS
from mergekit_expert.testing.tiny import VOCAB_SIZE
from mergekit_expert.testing.tokenizer import tiny_tokenizer
from mergekit_expert.vocabulary import (
    check_expert_vocabulary,
    compare_vocabularies,
    embedding_cosine,
    vocabulary_map,
)

CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tokenizers():
    base = tiny_tokenizer(CORPUS, VOCAB_SIZE)
    expert = copy.deepcopy(base)
    expert.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
    return base, expert


def test_added_tokens_extend_the_base(tokenizers):
    base, expert = tokenizers
    n = len(base)
    assert len(expert) == n + 2
    check = compare_vocabularies(base.get_vocab(), expert.get_vocab())
    assert check.relation == "extended"
    assert check.added == tuple(CHAT_TOKENS) and check.missing == ()
    vmap = vocabulary_map(base.get_vocab(), expert.get_vocab())
    assert vmap.prefix and not vmap.identity and vmap.shared == n
    assert vmap.teacher_to_student[:n].tolist() == list(range(n))
    assert vmap.teacher_to_student[n:].tolist() == [-1, -1]
    assert vmap.unmapped == {n: CHAT_TOKENS[0], n + 1: CHAT_TOKENS[1]}
    same = vocabulary_map(base.get_vocab(), base.get_vocab())
    assert same.identity


def test_plain_text_maps_and_added_tokens_are_refused(tokenizers):
    base, expert = tokenizers
    vmap = vocabulary_map(base.get_vocab(), expert.get_vocab())
    for text in CORPUS[:5]:
        ids = expert(text)["input_ids"]
        assert ids == base(text)["input_ids"]  # same BPE below the added tokens
        assert vmap.to_student_ids(ids).tolist() == ids
    chat = expert("<|im_start|>user\nHi<|im_end|>")["input_ids"]
    assert vmap.unmapped_in(chat) == CHAT_TOKENS
    with pytest.raises(ExpertMergingError, match=r"chat.jsonl:3.*<\|im_start\|>"):
        vmap.to_student_ids(chat, where="chat.jsonl:3")
    # a pseudo-label ending with the expert's end-of-turn token loses just that
    reply = expert("Merging models.")["input_ids"]
    end = expert.convert_tokens_to_ids("<|im_end|>")
    assert vmap.cut_at_unmapped(reply + [end, 5]) == reply


def test_shared_vocabulary_kl(tokenizers):
    base, expert = tokenizers
    vmap = vocabulary_map(base.get_vocab(), expert.get_vocab())
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(7, len(base), generator=generator, requires_grad=True)
    teacher = torch.randn(7, len(expert), generator=generator)
    loss = logit_loss(vmap.student_logits(student), vmap.teacher_logits(teacher))
    # by hand: both distributions renormalized over the shared (base) tokens
    p = torch.softmax(teacher[:, : len(base)].double(), -1)
    q = torch.softmax(student[:, : len(base)].double(), -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(loss.double(), expected)
    loss.backward()
    assert student.grad.abs().sum() > 0
    # top-k of the shared tokens, expressed in student ids, as the cache keeps it
    values, indices = vmap.teacher_top_k(teacher, k=len(base))
    topk_loss = logit_loss(student, values, indices=indices)
    torch.testing.assert_close(topk_loss.double(), expected)


def test_permuted_vocabulary_maps_by_string(tokenizers):
    base, _ = tokenizers
    vocab = base.get_vocab()
    order = sorted(vocab, key=lambda t: -vocab[t])  # reversed ids
    permuted = {t: i for i, t in enumerate(order)}
    check = compare_vocabularies(vocab, permuted)
    assert check.relation == "permuted" and check.moved > 0
    vmap = vocabulary_map(vocab, permuted)
    assert not vmap.prefix
    teacher = torch.randn(3, len(vocab))
    in_student_order = vmap.teacher_logits(teacher)
    for token in ("<s>", "Ġquick", "def"):
        if token in vocab:
            assert torch.equal(
                in_student_order[:, vocab[token]], teacher[:, permuted[token]]
            )


def test_renamed_reserved_token_is_an_edit(tokenizers):
    base, _ = tokenizers
    vocab = dict(base.get_vocab())
    edited = dict(vocab)
    edited["<|im_start|>"] = edited.pop("<pad>")  # same id, new string
    check = compare_vocabularies(vocab, edited)
    assert check.relation == "edited" and check.missing == ("<pad>",)
    vmap = vocabulary_map(vocab, edited)
    assert vmap.unmapped_in([vocab["<pad>"]]) == ["<|im_start|>"]


def test_padding_rows_are_not_tokens(tokenizers):
    base, expert = tokenizers
    # the expert's embedding was resized to a multiple of 64 rows
    vmap = vocabulary_map(base.get_vocab(), expert.get_vocab(), len(base), 384)
    assert vmap.teacher_size == 384 and vmap.shared == len(base)
    assert vmap.teacher_logits(torch.zeros(2, 384)).shape == (2, len(base))
    assert vmap.unmapped_in([383]) == ["<id 383>"]


def test_different_base_is_refused(tokenizers, tmp_path):
    base, _ = tokenizers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    other = Tokenizer(models.BPE(unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.train_from_iterator(
        ["completely different text " * 3, "zebra yak xylophone"] * 10,
        trainers.BpeTrainer(
            vocab_size=len(base),
            special_tokens=["<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    other = PreTrainedTokenizerFast(tokenizer_object=other)
    assert compare_vocabularies(base.get_vocab(), other.get_vocab()).relation == (
        "different"
    )
    with pytest.raises(ExpertMergingError, match="different vocabulary"):
        check_expert_vocabulary(
            "other", base.get_vocab(), other.get_vocab(), tokenizer_source="union"
        )


def test_check_uses_embeddings_and_needs_a_tokenizer_source(tokenizers):
    base, expert = tokenizers
    n = len(base)
    generator = torch.Generator().manual_seed(1)
    base_embedding = torch.randn(n, 16, generator=generator) * 0.02
    fine_tuned = torch.cat(
        [
            base_embedding + torch.randn(n, 16, generator=generator) * 0.002,
            torch.randn(2, 16, generator=generator) * 0.02,  # the added rows
        ]
    )
    unrelated = torch.randn(n + 2, 16, generator=generator) * 0.02
    vmap = vocabulary_map(base.get_vocab(), expert.get_vocab())
    assert embedding_cosine(base_embedding, fine_tuned, vmap) > 0.95
    assert abs(embedding_cosine(base_embedding, unrelated, vmap)) < 0.2
    kwargs = dict(base_embedding=base_embedding, tokenizer_source="union")
    check = check_expert_vocabulary(
        "chat",
        base.get_vocab(),
        expert.get_vocab(),
        expert_embedding=fine_tuned,
        **kwargs,
    )
    assert check.relation == "extended" and check.embedding_cosine > 0.95
    with pytest.raises(ExpertMergingError, match="not a fine-tune of this base"):
        check_expert_vocabulary(
            "chat",
            base.get_vocab(),
            expert.get_vocab(),
            expert_embedding=unrelated,
            **kwargs,
        )
    with pytest.raises(ExpertMergingError, match="set tokenizer_source"):
        check_expert_vocabulary("chat", base.get_vocab(), expert.get_vocab())


def test_extended_tokenizer_saved_and_reloaded(tokenizers, tmp_path):
    """What the preflight will see: the tokenizer files an expert ships."""
    from transformers import AutoTokenizer

    base, expert = tokenizers
    expert.save_pretrained(str(tmp_path))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert os.path.exists(tmp_path / "tokenizer.json")
    check = compare_vocabularies(base.get_vocab(), reloaded.get_vocab())
    assert check.relation == "extended" and check.added == tuple(CHAT_TOKENS)
