"""A tiny multi-domain corpus built once per test session with the project's own tools."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.helpers import python


def build_tiny_corpus(root: Path, *, size_mb: float = 0.4, vocab_size: int = 512) -> dict[str, Path]:
    """Demo corpus -> SentencePiece tokenizer -> one indexed dataset per domain -> registry."""
    corpus = root / "corpus"
    python("tools/make_demo_corpus.py", "--output-dir", corpus, "--size-mb", str(size_mb), "--seed", "7")
    registry = corpus / "domains.yaml"
    names = [d["name"] for d in yaml.safe_load(registry.read_text())["domains"]]
    python("tools/train_tokenizer.py", "--input", *[corpus / f"{n}.jsonl" for n in names],
           "--output-prefix", root / "tokenizer", "--vocab-size", str(vocab_size), "--model-type", "bpe")
    for name in names:
        python("tools/preprocess_data.py", "--input", corpus / f"{name}.jsonl", "--output-prefix", corpus / name,
               "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", root / "tokenizer.model",
               "--append-eod", "--workers", "1")
    return {"registry": registry, "tokenizer": root / "tokenizer.model", "root": root, "names": json.dumps(names)}
