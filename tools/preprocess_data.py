"""JSONL -> Megatron indexed datasets ``<output-prefix>_<key>_document.{bin,idx}``.

Same flags and output format as Megatron-LM's tool (the files are interchangeable), written with
megatron-core's ``IndexedDatasetBuilder``:

    python tools/preprocess_data.py --input code.jsonl --output-prefix data/code \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod --workers 8

Bad lines (malformed JSON, missing key, non-string value, empty document) are counted per kind with
their first line numbers; ``--on-bad-lines fail`` (default) stops at the first with nothing written,
``skip`` drops them. Blank lines are skipped and counted. Outputs are written under temporary names in
the output directory and renamed at the end, so an existing dataset is never half-overwritten (and is
only replaced at all with ``--overwrite``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # run as `python tools/preprocess_data.py`: make megatron_ddk importable
    sys.path.insert(0, _ROOT)  # (not `import _bootstrap`: the tests import this file as tools.preprocess_data)

from megatron_ddk.data.input_files import expand_input_files  # noqa: E402
from megatron_ddk.errors import DataError, UserError  # noqa: E402

BAD_KINDS = ("malformed JSON", "missing key", "not a string", "empty document")
ON_BAD_LINES = ("fail", "skip")
SHOWN_LINE_NUMBERS = 5
_worker: dict = {}  # per-process encoder and settings, set once by _init_worker


class PreprocessError(DataError, RuntimeError):
    """A one-line, user-facing reason the run stopped (nothing was written)."""


@dataclass
class Stats:
    documents: int = 0
    tokens: int = 0
    blank_lines: int = 0
    bad: Counter = field(default_factory=Counter)
    first_bad: dict[str, list[str]] = field(default_factory=dict)

    def record_bad(self, kind: str, where: str) -> None:
        self.bad[kind] += 1
        shown = self.first_bad.setdefault(kind, [])
        if len(shown) < SHOWN_LINE_NUMBERS:
            shown.append(where)

    def bad_summary(self) -> str:
        return "; ".join(
            f"{self.bad[k]} {k} (e.g. {', '.join(self.first_bad[k])})" for k in BAD_KINDS if self.bad[k]
        )


def _init_worker(
    tokenizer_type: str, tokenizer_file: str, eod: int, keys: list[str], append_eod: bool
) -> None:
    _worker.update(
        encode=raw_encoder(tokenizer_type, tokenizer_file), eod=eod, keys=keys, append_eod=append_eod
    )


def raw_encoder(tokenizer_type: str, tokenizer_file: str) -> Callable[[str], list[int]]:
    """Text -> ids with the tokenizer library alone, the same calls ``megatron_ddk.data.tokenizer`` makes.

    Workers skip importing torch and megatron-core this way (about 350 MB and seconds each); the main
    process has already checked the tokenizer and resolved its end-of-document id.
    """
    if tokenizer_type == "SentencePieceTokenizer":
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_file=tokenizer_file).encode
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_file)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


def _encode(line: bytes) -> tuple[list[np.ndarray] | None, str | None, int]:
    """(token arrays per key, or None; problem kind, "blank" or None; bytes consumed) for one line."""
    if not line.strip():
        return None, "blank", len(line)
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None, "malformed JSON", len(line)
    if not isinstance(record, dict):
        return None, "malformed JSON", len(line)
    arrays = []
    for key in _worker["keys"]:
        if key not in record:
            return None, "missing key", len(line)
        if not isinstance(record[key], str):
            return None, "not a string", len(line)
        ids = _worker["encode"](record[key])
        if len(ids) == 0:
            return None, "empty document", len(line)
        if _worker["append_eod"]:
            ids = [*ids, _worker["eod"]]
        arrays.append(np.asarray(ids, dtype=np.int64))
    return arrays, None, len(line)


def output_paths(prefix: str, key: str) -> tuple[Path, Path]:
    """Megatron's naming: ``<prefix>_<key>_document.bin`` and ``.idx``."""
    base = f"{prefix}_{key}_document"
    return Path(base + ".bin"), Path(base + ".idx")


def preprocess(
    inputs: list[str],
    output_prefix: str,
    *,
    tokenizer_type: str,
    tokenizer_model: str,
    json_keys: list[str] | tuple[str, ...] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    on_bad_lines: str = "fail",
    overwrite: bool = False,
    log_interval: int = 0,
    progress: bool = True,
) -> Stats:
    """Tokenize JSONL ``inputs`` into one indexed dataset per key; returns the counts.

    Raises PreprocessError (nothing written, nothing replaced) on bad input or existing outputs.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_ddk.data.tokenizer import build_tokenizer

    json_keys = list(json_keys)
    problems = []
    if on_bad_lines not in ON_BAD_LINES:
        problems.append(f"--on-bad-lines {on_bad_lines!r}: use one of {', '.join(ON_BAD_LINES)}")
    if workers < 1:
        problems.append(f"--workers must be >= 1, got {workers}")
    if not json_keys or len(set(json_keys)) != len(json_keys):
        problems.append(f"--json-keys {' '.join(json_keys)}: give one or more distinct keys")
    if problems:
        raise PreprocessError("; ".join(problems))
    inputs, missing = expand_input_files(inputs)
    if missing:
        raise PreprocessError(f"--input: no such file(s): {', '.join(missing)}")
    finals = [p for key in json_keys for p in output_paths(output_prefix, key)]
    existing = [str(p) for p in finals if p.exists()]
    if existing and not overwrite:
        raise PreprocessError(
            f"--output-prefix {output_prefix}: {existing[0]} exists; pass --overwrite to replace it"
        )
    try:
        tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)  # fail fast, before any worker starts
    except (ValueError, FileNotFoundError) as err:
        raise PreprocessError(str(err)) from err
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    out_dir = Path(output_prefix).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = [p.with_name(f".{p.name}.tmp{os.getpid()}") for p in finals]
    stats = Stats()
    total_bytes = sum(os.path.getsize(p) for p in inputs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr)
    init_args = (tokenizer.type_name, str(tokenizer.source), tokenizer.eod, json_keys, append_eod)
    pool = None
    start, done_bytes = time.time(), 0
    try:
        builders = [IndexedDatasetBuilder(str(staging[2 * i]), dtype=dtype) for i in range(len(json_keys))]
        if workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, init_args)
        else:
            _init_worker(*init_args)
        for path in inputs:
            for number, (arrays, problem, size) in enumerate(_encoded_lines(path, pool), 1):
                done_bytes += size
                if bar is not None:
                    bar.update(size)
                if problem == "blank":
                    stats.blank_lines += 1
                    continue
                if problem is not None:
                    stats.record_bad(problem, f"{path}:{number}")
                    if on_bad_lines == "fail":
                        raise PreprocessError(
                            f"{path}:{number}: {problem} (--json-keys {' '.join(json_keys)}); fix the input "
                            "or pass --on-bad-lines skip to drop such lines; nothing was written"
                        )
                    continue
                for builder, ids in zip(builders, arrays):
                    builder.add_document(ids, [len(ids)])
                stats.documents += 1
                stats.tokens += sum(len(a) for a in arrays)
                if log_interval > 0 and stats.documents % log_interval == 0 and bar is None:
                    elapsed = max(time.time() - start, 1e-9)
                    print(
                        f"processed {stats.documents} documents ({done_bytes / elapsed / 1e6:.2f} MB/s, "
                        f"{stats.tokens / elapsed:.0f} tokens/s)",
                        file=sys.stderr,
                        flush=True,
                    )
        if stats.documents == 0:
            raise PreprocessError(
                f"--input {', '.join(inputs)}: no usable documents "
                f"({stats.bad_summary() or 'the input is empty'}); nothing was written"
            )
        for i, builder in enumerate(builders):
            builder.finalize(str(staging[2 * i + 1]))
        for tmp, final in zip(staging, finals):  # publish only once every output is complete
            os.replace(tmp, final)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
        for tmp in staging:
            tmp.unlink(missing_ok=True)
    return stats


def _encoded_lines(path: str, pool) -> Iterator[tuple]:
    """Encoded lines of one file, in order; read as bytes (exact progress, decoding happens in workers)."""
    with open(path, "rb") as handle:
        yield from (pool.imap(_encode, handle, chunksize=64) if pool is not None else map(_encode, handle))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input", nargs="+", required=True, help="JSONL file(s) or glob patterns, read in order"
    )
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.{bin,idx}")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize, one dataset each")
    parser.add_argument(
        "--tokenizer-type", required=True, choices=("SentencePieceTokenizer", "HuggingFaceTokenizer")
    )
    parser.add_argument(
        "--tokenizer-model",
        required=True,
        help="SentencePiece .model, or tokenizer.json / a Hugging Face model directory",
    )
    parser.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument(
        "--log-interval", type=int, default=0, help="with --no-progress: print throughput every N documents"
    )
    parser.add_argument("--on-bad-lines", choices=ON_BAD_LINES, default="fail")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        stats = preprocess(
            args.input,
            args.output_prefix,
            tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            on_bad_lines=args.on_bad_lines,
            overwrite=args.overwrite,
            log_interval=args.log_interval,
            progress=not args.no_progress,
        )
    except UserError as err:
        print(f"preprocess_data.py: error: {err}", file=sys.stderr)
        return 2
    elapsed = max(time.time() - start, 1e-9)
    extra = f", skipped: {stats.bad_summary()}" if stats.bad else ""
    extra += f", blank lines: {stats.blank_lines}" if stats.blank_lines else ""
    outputs = ", ".join(str(output_paths(args.output_prefix, k)[0].with_suffix("")) for k in args.json_keys)
    print(
        f"{outputs}: documents={stats.documents}, tokens={stats.tokens}, "
        f"tokens/s={stats.tokens / elapsed:.0f}{extra}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
