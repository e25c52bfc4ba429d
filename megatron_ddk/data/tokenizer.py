"""Tokenizers: a SentencePiece model or a Hugging Face ``tokenizer.json``, behind one small interface.

megatron-core's GPTDataset needs ``vocab_size``, ``eod``, ``pad`` and ``unique_identifiers`` (hashed
into its index-cache names); preprocessing needs ``tokenize``. ``tokenizer_identity`` is what every
checkpoint records, so a teacher and a student can prove they share a vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer")
NO_PAD = -1
"""megatron-core's convention for "no pad token": an id that never occurs in the data."""
_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|im_end|>", "<eos>", "<|end_of_text|>")


class Tokenizer:
    """Common interface; ``vocab_size`` is the true (unpadded) vocabulary size."""

    kind: str
    source: Path

    def __init__(self, source: Path):
        self.source = source
        self._sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", [str(source)]), ("sha256", self.sha256)])

    @property
    def sha256(self) -> str:
        return self._sha256

    vocab_size: int
    eod: int
    pad: int

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def detokenize(self, ids) -> str:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    kind = "SentencePieceTokenizer"

    def __init__(self, model_file: Path):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = self._sp.get_piece_size()
        self.eod = self._sp.eos_id()
        if self.eod < 0:
            raise ValueError(f"--tokenizer-model {model_file}: the SentencePiece model has no end-of-sequence token; "
                             "retrain it with tools/train_tokenizer.py (which defines one)")
        pad = self._sp.pad_id()
        self.pad = pad if pad >= 0 and pad != self.eod else NO_PAD
        super().__init__(model_file)

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer(Tokenizer):
    """A fast tokenizer from ``tokenizer.json`` (the ``tokenizers`` library; ids match ``transformers``)."""

    kind = "HuggingFaceTokenizer"

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as FastTokenizer

        tokenizer_json = path / "tokenizer.json" if path.is_dir() else path
        if not tokenizer_json.exists():
            raise FileNotFoundError(f"--tokenizer-model {path}: no tokenizer.json there; point it at a Hugging Face "
                                    "model directory or its tokenizer.json")
        self._tok = FastTokenizer.from_file(str(tokenizer_json))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = _read_json(tokenizer_json.parent / "tokenizer_config.json")
        special = _read_json(tokenizer_json.parent / "special_tokens_map.json")
        eos = _token_text(config.get("eos_token")) or _token_text(special.get("eos_token"))
        candidates = [eos] if eos else list(_EOS_CANDIDATES)
        ids = [self._tok.token_to_id(c) for c in candidates if c and self._tok.token_to_id(c) is not None]
        if not ids:
            raise ValueError(f"--tokenizer-model {path}: no end-of-document token found (looked for "
                             f"{candidates}); add eos_token to tokenizer_config.json")
        self.eod = ids[0]
        pad_text = _token_text(config.get("pad_token")) or _token_text(special.get("pad_token"))
        pad = self._tok.token_to_id(pad_text) if pad_text else None
        self.pad = pad if pad is not None and pad != self.eod else NO_PAD
        super().__init__(tokenizer_json)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | Path) -> Tokenizer:
    """``--tokenizer-type`` / ``--tokenizer-model`` -> tokenizer, with one-line errors for bad values."""
    path = Path(tokenizer_model)
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not supported; use one of {', '.join(TOKENIZER_TYPES)}")
    if not path.exists():
        raise FileNotFoundError(f"--tokenizer-model {path}: no such file or directory")
    if tokenizer_type == "SentencePieceTokenizer":
        if path.is_dir():
            raise ValueError(f"--tokenizer-model {path} is a directory; give the SentencePiece .model file")
        return SentencePieceTokenizer(path)
    return HuggingFaceTokenizer(path)


def tokenizer_identity(tokenizer: Tokenizer) -> dict:
    """What a checkpoint records about its tokenizer (compared between teacher and student)."""
    return {"type": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "sha256": tokenizer.sha256,
            "eod": tokenizer.eod}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value
