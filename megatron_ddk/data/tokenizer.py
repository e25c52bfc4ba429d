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
from pathlib import Path

from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

from megatron_ddk.errors import DataError, MissingFileError

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer")
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|im_end|>", "<eos>", "<|end_of_text|>")
"""End-of-document tokens looked up, in this order, when a Hugging Face directory names no eos_token."""
END_OF_TURN_TOKENS = {"<|eot_id|>": "<|end_of_text|>"}
"""Llama 3.x chat models name their end-of-turn token as eos_token; the documents we train on end with
the end-of-text token that separated documents in pre-training (it is in the same vocabulary)."""


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
    def detokenize(self, ids) -> str:
        """Text of ``ids``."""


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model``; its eos id is the end-of-document token."""

    type_name = "SentencePieceTokenizer"

    def __init__(self, model_file: Path):
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as err:
            raise DataError(
                f"--tokenizer-model {model_file}: not a SentencePiece model ({err}); "
                "give the .model file written by tools/train_tokenizer.py"
            ) from err
        eod = self._sp.eos_id()
        if eod < 0:
            raise DataError(
                f"--tokenizer-model {model_file}: the SentencePiece model has no end-of-sequence "
                "token; retrain it with tools/train_tokenizer.py (which defines one)"
            )
        pad = self._sp.pad_id()
        super().__init__(
            model_file, vocab_size=self._sp.get_piece_size(), eod=eod, pad=pad if pad >= 0 else eod
        )

    @property
    def vocab(self) -> dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def detokenize(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer(Tokenizer):
    """A fast tokenizer from ``tokenizer.json`` via the ``tokenizers`` library.

    Ids equal ``transformers``' ``tokenizer(text, add_special_tokens=False)``: no BOS/EOS template,
    and truncation or padding saved in the file is switched off as transformers does per call.
    """

    type_name = "HuggingFaceTokenizer"

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as FastTokenizer

        tokenizer_json = path / "tokenizer.json" if path.is_dir() else path
        if not tokenizer_json.is_file():
            raise MissingFileError(
                f"--tokenizer-model {path}: no tokenizer.json there; point it at a Hugging "
                "Face model directory or at its tokenizer.json"
            )
        try:
            self._tok = FastTokenizer.from_file(str(tokenizer_json))
        except Exception as err:  # the Rust side raises a bare Exception on malformed files
            raise DataError(
                f"--tokenizer-model {tokenizer_json}: not a Hugging Face tokenizer.json ({err})"
            ) from err
        self._tok.no_truncation()
        self._tok.no_padding()
        config = _read_json(tokenizer_json.parent / "tokenizer_config.json")
        special = _read_json(tokenizer_json.parent / "special_tokens_map.json")
        eos = _token_text(config.get("eos_token")) or _token_text(special.get("eos_token"))
        if eos in END_OF_TURN_TOKENS and self._tok.token_to_id(END_OF_TURN_TOKENS[eos]) is not None:
            eos = END_OF_TURN_TOKENS[eos]
        if eos is not None:
            eod = self._tok.token_to_id(eos)
            if eod is None:
                raise DataError(
                    f"--tokenizer-model {path}: eos_token {eos!r} named next to {tokenizer_json.name} is "
                    "not in its vocabulary; fix eos_token in tokenizer_config.json"
                )
        else:
            found = [i for i in (self._tok.token_to_id(c) for c in EOS_CANDIDATES) if i is not None]
            if not found:
                raise DataError(
                    f"--tokenizer-model {path}: no end-of-document token (no eos_token in "
                    f"tokenizer_config.json and none of {', '.join(EOS_CANDIDATES)} in the vocabulary); "
                    "add eos_token to tokenizer_config.json"
                )
            eod = found[0]
        pad_text = _token_text(config.get("pad_token")) or _token_text(special.get("pad_token"))
        pad = self._tok.token_to_id(pad_text) if pad_text else None
        super().__init__(
            tokenizer_json,
            vocab_size=self._tok.get_vocab_size(with_added_tokens=True),
            eod=eod,
            pad=eod if pad is None else pad,
        )

    @property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | Path) -> Tokenizer:
    """``--tokenizer-type`` / ``--tokenizer-model`` -> tokenizer, with one-line errors for bad values."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise DataError(
            f"--tokenizer-type {tokenizer_type!r} is not supported; use one of {', '.join(TOKENIZER_TYPES)}"
        )
    if tokenizer_model is None or str(tokenizer_model) == "":
        raise DataError(f"--tokenizer-model is required with --tokenizer-type {tokenizer_type}")
    path = Path(tokenizer_model).expanduser()
    if not path.exists():
        raise MissingFileError(f"--tokenizer-model {path}: no such file or directory")
    if tokenizer_type == "SentencePieceTokenizer":
        if path.is_dir():
            raise DataError(f"--tokenizer-model {path} is a directory; give the SentencePiece .model file")
        return SentencePieceTokenizer(path)
    return HuggingFaceTokenizer(path)


def tokenizer_identity(tokenizer: Tokenizer) -> dict:
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


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"--tokenizer-model: {path} is not valid JSON ({err}); fix or remove it") from err
    return data if isinstance(data, dict) else {}


def _token_text(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken mapping."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None
