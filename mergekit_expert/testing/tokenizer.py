"""The one byte-level BPE trainer of the tests, the demo and the benchmarks.

Tiny models need a tiny vocabulary, and nothing may be downloaded, so every
fixture trains its own tokenizer on its own text. The callers differ only in
the vocabulary size, the text, the special tokens and two options (one digit
per token; a BOS prepended by the tokenizer itself), so :func:`train_bpe`
takes those as arguments and two wrappers give the two flavours in use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

# <unk> first, then <s> = 1, </s> = 2, <pad> = 3: the ids tiny_config() uses.
TINY_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
# <pad> = 0, <s> = 1, </s> = 2; encoding prepends <s>.
BOS_SPECIALS = ("<pad>", "<s>", "</s>")


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str],
    *,
    unk_token: str | None = None,
    split_digits: bool = False,
    bos_token: str | None = None,
) -> Tokenizer:
    """A byte-level BPE (no prefix space) trained on ``texts``.

    ``split_digits``: every digit is its own token (a small model then learns
    carries instead of memorising multi-digit tokens). ``bos_token``: a
    post-processor prepends it to every encoded sequence, so any consumer
    calling ``tokenizer(text)`` sees the sequence start a model was trained with.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token=unk_token))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        bpe.pre_tokenizer = byte_level
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    if bos_token is not None:
        from tokenizers import processors

        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, bpe.token_to_id(bos_token))],
        )
    return bpe


def tiny_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """<unk> <s> </s> <pad> (ids 0-3), no BOS added: the test suite's and gpu_scale's."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(texts, vocab_size, TINY_SPECIALS, unk_token="<unk>"),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def bos_tokenizer(
    texts: Iterable[str], vocab_size: int, split_digits: bool = False
) -> PreTrainedTokenizerFast:
    """<pad> <s> </s> (ids 0-2); encoding adds BOS, callers append EOS themselves.

    The demo's and the quality benchmark's (digits split) and scale's.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(
            texts, vocab_size, BOS_SPECIALS, split_digits=split_digits, bos_token="<s>"
        ),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
