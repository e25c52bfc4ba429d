"""Train a SentencePiece tokenizer on JSONL files (one JSON object per line, text under --json-key).

    python tools/train_tokenizer.py --input data/*.jsonl --output-prefix data/tok --vocab-size 32000

Writes ``<prefix>.model`` and ``<prefix>.vocab``; ids: 0 <unk>, 1 <s>, 2 </s> (the EOD token the
datasets use), 3 <pad>. Byte fallback is on, so no text is ever unknown.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import _bootstrap  # noqa: F401


def iter_texts(files: list[str], key: str, max_sentences: int | None, seed: int) -> Iterator[str]:
    """Texts from every file; with ``max_sentences``, a reproducible sample of about that many."""
    total = sum(1 for f in files for _ in open(f, encoding="utf-8")) if max_sentences else 0
    keep = 1.0 if not max_sentences or total <= max_sentences else max_sentences / total
    rng = random.Random(seed)
    for path in files:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if keep < 1.0 and rng.random() > keep:
                    continue
                try:
                    text = json.loads(line).get(key)
                except (json.JSONDecodeError, AttributeError):
                    print(f"warning: {path}:{number}: not a JSON object, skipped", file=sys.stderr)
                    continue
                if isinstance(text, str) and text.strip():
                    yield text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files or glob patterns")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", choices=("bpe", "unigram", "char", "word"), default="bpe")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-sentences", type=int, default=None, help="sample about this many documents")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    files = sorted({f for pattern in args.input for f in (glob.glob(pattern) or [pattern])})
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        parser.error(f"--input: no such file(s): {', '.join(missing)}")
    if args.vocab_size < 16:
        parser.error(f"--vocab-size must be >= 16, got {args.vocab_size}")
    import sentencepiece

    output = Path(args.output_prefix)
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with tempfile.TemporaryDirectory(dir=output.parent) as staging:
        prefix = os.path.join(staging, "tok")
        try:
            _train(sentencepiece, files, args, prefix)
        except RuntimeError as err:  # sentencepiece reports bad settings as RuntimeError
            print(f"train_tokenizer.py: error: {str(err).splitlines()[-1]}", file=sys.stderr)
            return 2
        for ext in (".model", ".vocab"):
            os.replace(prefix + ext, f"{output}{ext}")
    size = sentencepiece.SentencePieceProcessor(model_file=f"{output}.model").get_piece_size()
    print(f"tokenizer {output}.model: vocab size {size}, {args.model_type}, trained on {len(files)} file(s) "
          f"in {time.time() - start:.1f}s")
    return 0


def _train(sentencepiece, files: list[str], args: argparse.Namespace, prefix: str) -> None:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter_texts(files, args.json_key, args.max_sentences, args.seed),
        model_prefix=prefix,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        num_threads=args.num_threads,
        byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )


if __name__ == "__main__":
    sys.exit(main())
