"""Tokenizers: a SentencePiece model or a Hugging Face ``tokenizer.json``, behind megatron-core's interface.

megatron-core's GPTDataset needs ``vocab_size``, ``eod``, ``pad`` and ``unique_identifiers`` (hashed
into its index-cache names); preprocessing needs ``tokenize``. ``tokenizer_identity`` is what every
checkpoint records, so a teacher and a student can prove they share a vocabulary.

``pad`` is the tokenizer's own pad id, else ``eod``. GPTDataset masks the loss on labels equal to
``pad`` and maps those tokens to 0, but when ``pad`` equals ``eod`` it detects the clash and pads
with -1 instead, so end-of-document tokens are still trained on (``datasets.py`` silences its warning).
"""

from __future__ import annotations

import hashlib
import json
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

from megatron_ddk.data.tokenizer_files import (  # noqa: F401  (TOKENIZER_TYPES, EOS_CANDIDATES: re-exported)
    EOS_CANDIDATES,
    TOKENIZER_TYPES,
    open_huggingface,
    open_sentencepiece,
    open_tokenizer_file,
)
from megatron_ddk.errors import DataError


class Tokenizer(MegatronLegacyTokenizer):
    """What GPTDataset and the tools need; ``vocab_size`` is the true (unpadded) vocabulary size.

    megatron-core's base ``__init__`` is not called: it only logs a deprecation notice and keys the
    cache on the tokenizer's path. Our ``unique_identifiers`` use the file's hash instead, so moving a
    tokenizer keeps the dataset caches valid and a changed file invalidates them.
    """

    type_name: str = ""

    def __init__(self, source: Path, *, vocab_size: int, eod: int, pad: int):
        self.source = source
        self.sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
        self._vocab_size, self._eod, self._pad = vocab_size, eod, pad
        self.unique_identifiers = OrderedDict(
            [
                ("class", type(self).__name__),
                ("sha256", self.sha256),
                ("vocab_size", vocab_size),
                ("eod", eod),
                ("pad", pad),
            ]
        )
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    @abstractmethod
    def vocab(self) -> dict[str, int]:
        """Token text -> id."""

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: token for token, i in self.vocab.items()}

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text`` without special tokens (the dataset appends the end-of-document id)."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model``; its eos id is the end-of-document token."""

    type_name = "SentencePieceTokenizer"

    def __init__(self, model_file: Path):
        opened = open_sentencepiece(model_file)
        self._sp = opened.library
        super().__init__(opened.source, vocab_size=opened.vocab_size, eod=opened.eod, pad=opened.pad)

    @property
    def vocab(self) -> dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer(Tokenizer):
    """A fast tokenizer from ``tokenizer.json`` via the ``tokenizers`` library.

    Ids equal ``transformers``' ``tokenizer(text, add_special_tokens=False)``: no BOS/EOS template,
    and truncation or padding saved in the file is switched off as transformers does per call.
    """

    type_name = "HuggingFaceTokenizer"

    def __init__(self, path: Path):
        opened = open_huggingface(path)
        self._tok = opened.library
        super().__init__(opened.source, vocab_size=opened.vocab_size, eod=opened.eod, pad=opened.pad)

    @property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | Path) -> Tokenizer:
    """``--tokenizer-type`` / ``--tokenizer-model`` -> tokenizer, with one-line errors for bad values."""
    opened = open_tokenizer_file(tokenizer_type, tokenizer_model)
    if opened.type_name == "SentencePieceTokenizer":
        return SentencePieceTokenizer(opened.source)
    return HuggingFaceTokenizer(opened.source)


def tokenizer_identity(tokenizer: Tokenizer) -> dict[str, Any]:
    """What a checkpoint records about its tokenizer (compared between teacher and student)."""
    return {
        "type": tokenizer.type_name,
        "vocab_size": tokenizer.vocab_size,
        "sha256": tokenizer.sha256,
        "eod": tokenizer.eod,
    }


def padded_vocab_size(
    vocab_size: int, tensor_model_parallel_size: int, make_vocab_size_divisible_by: int = 128
) -> int:
    """Megatron's rule: embedding rows: ``vocab_size`` rounded up to a multiple of ``divisible_by * TP``."""
    if vocab_size < 1 or tensor_model_parallel_size < 1 or make_vocab_size_divisible_by < 1:
        raise DataError(
            f"padded_vocab_size({vocab_size}, {tensor_model_parallel_size}, "
            f"{make_vocab_size_divisible_by}): every argument must be >= 1"
        )
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple
