"""Open a tokenizer file with its own library (sentencepiece or tokenizers), without torch or megatron-core.

``megatron_ddk.data.tokenizer`` wraps these for training; ``tools/preprocess_data.py`` uses them
directly so that it starts in a fraction of a second instead of importing megatron-core (4-8 s).
Both therefore resolve the end-of-document and pad ids, and report a bad file, the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_ddk.errors import DataError, MissingFileError

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer")
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|im_end|>", "<eos>", "<|end_of_text|>")
"""End-of-document tokens looked up, in this order, when a Hugging Face directory names no eos_token."""
END_OF_TURN_TOKENS = {"<|eot_id|>": "<|end_of_text|>"}
"""Llama 3.x chat models name their end-of-turn token as eos_token; the documents we train on end with
the end-of-text token that separated documents in pre-training (it is in the same vocabulary)."""


@dataclass(frozen=True)
class TokenizerFile:
    """A loaded tokenizer library object and the ids every user of it needs."""

    type_name: str
    source: Path
    """The file itself: the SentencePiece ``.model`` or the ``tokenizer.json``."""
    library: Any
    """``sentencepiece.SentencePieceProcessor`` or ``tokenizers.Tokenizer`` (neither ships type stubs)."""
    """``sentencepiece.SentencePieceProcessor`` or ``tokenizers.Tokenizer`` (truncation and padding off)."""
    vocab_size: int
    eod: int
    pad: int


def open_tokenizer_file(tokenizer_type: str, tokenizer_model: str | Path | None) -> TokenizerFile:
    """``--tokenizer-type`` / ``--tokenizer-model`` -> the loaded file, with one-line errors for bad values."""
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
        return open_sentencepiece(path)
    return open_huggingface(path)


def open_sentencepiece(model_file: Path) -> TokenizerFile:
    """A SentencePiece ``.model``; its eos id is the end-of-document token."""
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    except (RuntimeError, OSError) as err:
        raise DataError(
            f"--tokenizer-model {model_file}: not a SentencePiece model ({err}); "
            "give the .model file written by tools/train_tokenizer.py"
        ) from err
    eod = sp.eos_id()
    if eod < 0:
        raise DataError(
            f"--tokenizer-model {model_file}: the SentencePiece model has no end-of-sequence "
            "token; retrain it with tools/train_tokenizer.py (which defines one)"
        )
    pad = sp.pad_id()
    return TokenizerFile(
        "SentencePieceTokenizer", Path(model_file), sp, sp.get_piece_size(), eod, pad if pad >= 0 else eod
    )


def open_huggingface(path: Path) -> TokenizerFile:
    """A fast tokenizer's ``tokenizer.json`` (or its directory), eos/pad from the files next to it."""
    from tokenizers import Tokenizer as FastTokenizer

    tokenizer_json = path / "tokenizer.json" if path.is_dir() else path
    if not tokenizer_json.is_file():
        raise MissingFileError(
            f"--tokenizer-model {path}: no tokenizer.json there; point it at a Hugging "
            "Face model directory or at its tokenizer.json"
        )
    try:
        tok = FastTokenizer.from_file(str(tokenizer_json))
    except Exception as err:  # the Rust side raises a bare Exception on malformed files
        raise DataError(
            f"--tokenizer-model {tokenizer_json}: not a Hugging Face tokenizer.json ({err})"
        ) from err
    tok.no_truncation()
    tok.no_padding()
    config = _read_json(tokenizer_json.parent / "tokenizer_config.json")
    special = _read_json(tokenizer_json.parent / "special_tokens_map.json")
    eos = _token_text(config.get("eos_token")) or _token_text(special.get("eos_token"))
    if eos in END_OF_TURN_TOKENS and tok.token_to_id(END_OF_TURN_TOKENS[eos]) is not None:
        eos = END_OF_TURN_TOKENS[eos]
    if eos is not None:
        eod = tok.token_to_id(eos)
        if eod is None:
            raise DataError(
                f"--tokenizer-model {path}: eos_token {eos!r} named next to {tokenizer_json.name} is "
                "not in its vocabulary; fix eos_token in tokenizer_config.json"
            )
    else:
        found = [i for i in (tok.token_to_id(c) for c in EOS_CANDIDATES) if i is not None]
        if not found:
            raise DataError(
                f"--tokenizer-model {path}: no end-of-document token (no eos_token in "
                f"tokenizer_config.json and none of {', '.join(EOS_CANDIDATES)} in the vocabulary); "
                "add eos_token to tokenizer_config.json"
            )
        eod = found[0]
    pad_text = _token_text(config.get("pad_token")) or _token_text(special.get("pad_token"))
    pad = tok.token_to_id(pad_text) if pad_text else None
    return TokenizerFile(
        "HuggingFaceTokenizer",
        tokenizer_json,
        tok,
        tok.get_vocab_size(with_added_tokens=True),
        eod,
        eod if pad is None else pad,
    )


def batch_encoder(tokenizer: TokenizerFile) -> Callable[[list[str]], list[list[int]]]:
    """Texts -> ids per text, no special tokens: the same ids as ``Tokenizer.tokenize``, one library
    call per batch (no per-document Python overhead). Single-threaded: parallelism is the caller's."""
    if tokenizer.type_name == "SentencePieceTokenizer":
        sp = tokenizer.library
        return lambda texts: sp.encode(texts, num_threads=1)
    tok = tokenizer.library  # not encode_batch: its thread pool would take every core in every worker
    return lambda texts: [tok.encode(text, add_special_tokens=False).ids for text in texts]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"--tokenizer-model: {path} is not valid JSON ({err}); fix or remove it") from err
    return data if isinstance(data, dict) else {}


def _token_text(value: object) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken mapping."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None
