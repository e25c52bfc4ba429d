"""Train a SentencePiece tokenizer on JSONL files (one JSON object per line, the text under --json-key).

    python tools/train_tokenizer.py --input 'data/*.jsonl' --output-prefix data/tok --vocab-size 32000

Writes ``<prefix>.model`` and ``<prefix>.vocab`` (each to a temporary name, then renamed). Ids:
0 <unk>, 1 <s>, 2 </s> (the end-of-document token preprocessing appends), 3 <pad>. The model is
lossless for code and data: no Unicode normalization, whitespace kept, byte fallback for unseen
characters, digits split one by one. Documents stream into SentencePiece (no text copy on disk),
cut at line breaks into pieces SentencePiece accepts; ``--max-sentences`` samples about that many
documents reproducibly (``--seed``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import _bootstrap  # noqa: F401

from megatron_ddk.data.input_files import expand_input_files

MAX_PIECE_CHARS = 8192
"""Longest text handed to SentencePiece at once; longer documents are cut at line breaks."""
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}


@dataclass
class ReadStats:
    documents: int = 0
    skipped: int = 0


def split_long(text: str, limit: int = MAX_PIECE_CHARS) -> Iterator[str]:
    """``text`` in pieces of at most ``limit`` characters, cut after line breaks where possible."""
    while len(text) > limit:
        cut = text.rfind("\n", 0, limit) + 1 or limit
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def iter_texts(
    files: list[str], key: str, max_sentences: int | None, seed: int, stats: ReadStats
) -> Iterator[str]:
    """Texts of every file in order; with ``max_sentences``, a reproducible sample of about that many."""
    keep = 1.0
    if max_sentences:
        total = 0
        for path in files:
            with open(path, "rb") as handle:
                total += sum(1 for _ in handle)
        keep = min(1.0, max_sentences / max(total, 1))
    rng = random.Random(seed)
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if keep < 1.0 and rng.random() >= keep:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                text = record.get(key) if isinstance(record, dict) else None
                if not isinstance(text, str) or not text.strip():
                    stats.skipped += 1
                    continue
                stats.documents += 1
                yield from split_long(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files or glob patterns")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.model and <prefix>.vocab")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", choices=("bpe", "unigram", "char", "word"), default="bpe")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-sentences", type=int, default=None, help="sample about this many documents")
    parser.add_argument("--seed", type=int, default=1234)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    files, missing = expand_input_files(args.input)
    problems = [f"--input: no such file(s): {', '.join(missing)}"] if missing else []
    if args.vocab_size < 300:
        problems.append(
            f"--vocab-size {args.vocab_size}: must be >= 300 (256 byte-fallback pieces, 4 special "
            "tokens and the corpus' characters)"
        )
    if not 0 < args.character_coverage <= 1:
        problems.append(f"--character-coverage {args.character_coverage}: must be in (0, 1]")
    if args.num_threads < 1:
        problems.append(f"--num-threads {args.num_threads}: must be >= 1")
    if args.max_sentences is not None and args.max_sentences < 1:
        problems.append(f"--max-sentences {args.max_sentences}: must be >= 1")
    if problems:
        parser.error("; ".join(problems))
    import sentencepiece

    output = Path(args.output_prefix)
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    stats = ReadStats()
    try:
        model = _train(
            sentencepiece, iter_texts(files, args.json_key, args.max_sentences, args.seed, stats), args
        )
    except RuntimeError as err:  # sentencepiece reports bad settings and too-small corpora as RuntimeError
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        print(f"train_tokenizer.py: error: {reason}", file=sys.stderr)
        return 2
    if stats.documents == 0:
        print(
            f"train_tokenizer.py: error: no text under --json-key {args.json_key!r} in {', '.join(files)}",
            file=sys.stderr,
        )
        return 2
    processor = sentencepiece.SentencePieceProcessor(model_proto=model)
    vocab = "".join(
        f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n" for i in range(len(processor))
    )
    _write_atomic(Path(f"{output}.model"), model)
    _write_atomic(Path(f"{output}.vocab"), vocab.encode("utf-8"))
    skipped = f", {stats.skipped} lines without text skipped" if stats.skipped else ""
    print(
        f"tokenizer {output}.model: vocab_size={len(processor)}, {args.model_type}, "
        f"{stats.documents} documents from {len(files)} file(s){skipped}, {time.time() - start:.1f}s"
    )
    return 0


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _train(sentencepiece, texts: Iterator[str], args: argparse.Namespace) -> bytes:
    """The serialized model; trained in memory, so the bytes hold no temporary path and are reproducible."""
    model = io.BytesIO()
    sentencepiece.set_random_generator_seed(args.seed)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=texts,
        model_writer=model,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        num_threads=args.num_threads,
        byte_fallback=True,
        normalization_rule_name="identity",  # lossless: keep code's whitespace and any Unicode as written
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=4 * MAX_PIECE_CHARS,  # bytes; split_long keeps every piece below it
        **SPECIAL_IDS,
        minloglevel=2,
    )
    return model.getvalue()


if __name__ == "__main__":
    sys.exit(main())
