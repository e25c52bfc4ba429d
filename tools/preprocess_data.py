"""JSONL -> Megatron indexed datasets ``<output-prefix>_<key>_document.{bin,idx}``.

Same flags and output as Megatron-LM's tool (files are interchangeable), written with
megatron-core's ``IndexedDatasetBuilder``:

    python tools/preprocess_data.py --input code.jsonl --output-prefix data/code \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod --workers 8

Bad lines (malformed JSON, missing key, non-string value, empty document) are counted per kind with
the first line numbers; ``--on-bad-lines fail`` (default) stops with nothing written, ``skip`` drops
them. Outputs are written under temporary names and renamed at the end, so an existing dataset is
never half-overwritten (and is only replaced with ``--overwrite``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import _bootstrap  # noqa: F401
import numpy as np

BAD_KINDS = ("malformed JSON", "missing key", "not a string", "empty document")
_worker_state: dict = {}


class PreprocessError(RuntimeError):
    pass


@dataclass
class Stats:
    documents: int = 0
    tokens: int = 0
    bad: Counter = field(default_factory=Counter)
    first_bad: dict = field(default_factory=lambda: defaultdict(list))

    def record_bad(self, kind: str, where: str) -> None:
        self.bad[kind] += 1
        if len(self.first_bad[kind]) < 5:
            self.first_bad[kind].append(where)

    def bad_summary(self) -> str:
        return "; ".join(f"{self.bad[k]} {k} (e.g. {', '.join(self.first_bad[k])})" for k in BAD_KINDS if self.bad[k])


def _init_worker(tokenizer_type: str, tokenizer_model: str, keys: list[str], append_eod: bool) -> None:
    from megatron_ddk.data.tokenizer import build_tokenizer

    _worker_state.update(tokenizer=build_tokenizer(tokenizer_type, tokenizer_model), keys=keys, append_eod=append_eod)


def _encode(line: str):
    """(per-key token arrays or None, problem kind or None) for one JSONL line."""
    tokenizer, keys = _worker_state["tokenizer"], _worker_state["keys"]
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None, "malformed JSON", len(line)
    if not isinstance(record, dict):
        return None, "malformed JSON", len(line)
    out = {}
    for key in keys:
        if key not in record:
            return None, "missing key", len(line)
        text = record[key]
        if not isinstance(text, str):
            return None, "not a string", len(line)
        ids = tokenizer.tokenize(text)
        if not ids:
            return None, "empty document", len(line)
        if _worker_state["append_eod"]:
            ids = list(ids) + [tokenizer.eod]
        out[key] = np.asarray(ids, dtype=np.int64)
    return out, None, len(line)


def output_paths(prefix: str, key: str) -> tuple[Path, Path]:
    base = f"{prefix}_{key}_document"
    return Path(base + ".bin"), Path(base + ".idx")


def preprocess(inputs: list[str], output_prefix: str, *, tokenizer_type: str, tokenizer_model: str,
               json_keys: list[str], append_eod: bool = False, workers: int = 1, on_bad_lines: str = "fail",
               overwrite: bool = False, progress: bool = True) -> Stats:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_ddk.data.tokenizer import build_tokenizer

    missing = [p for p in inputs if not os.path.isfile(p)]
    if missing:
        raise PreprocessError(f"--input: no such file(s): {', '.join(missing)}")
    existing = [str(p) for key in json_keys for p in output_paths(output_prefix, key) if p.exists()]
    if existing and not overwrite:
        raise PreprocessError(f"--output-prefix {output_prefix}: {existing[0]} exists; pass --overwrite to replace it")
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)  # fail fast on a bad tokenizer
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    staging = {key: [Path(f"{p}.tmp{os.getpid()}") for p in output_paths(output_prefix, key)] for key in json_keys}
    builders = {key: IndexedDatasetBuilder(str(staging[key][0]), dtype=dtype) for key in json_keys}
    stats = Stats()
    total_bytes = sum(os.path.getsize(p) for p in inputs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr)
    init_args = (tokenizer_type, str(tokenizer_model), json_keys, append_eod)
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, init_args) if workers > 1 else None
    if pool is None:
        _init_worker(*init_args)
    try:
        for path in inputs:
            with open(path, encoding="utf-8", errors="strict") as handle:
                lines = pool.imap(_encode, handle, chunksize=64) if pool else map(_encode, handle)
                for number, (arrays, problem, size) in enumerate(lines, 1):
                    if bar is not None:
                        bar.update(size)
                    if problem is not None:
                        stats.record_bad(problem, f"{path}:{number}")
                        if on_bad_lines == "fail":
                            raise PreprocessError(
                                f"{path}:{number}: {problem} (key(s) {', '.join(json_keys)}); fix the input or pass "
                                "--on-bad-lines skip; nothing was written")
                        continue
                    for key, ids in arrays.items():
                        builders[key].add_document(ids, [len(ids)])
                    stats.documents += 1
                    stats.tokens += sum(len(a) for a in arrays.values())
        if stats.documents == 0:
            raise PreprocessError(f"--input {', '.join(inputs)}: no usable documents ({stats.bad_summary() or 'empty'})")
        for key in json_keys:
            builders[key].finalize(str(staging[key][1]))
        for key in json_keys:  # publish: every output complete before any is renamed
            for tmp, final in zip(staging[key], output_paths(output_prefix, key)):
                os.replace(tmp, final)
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
        for paths in staging.values():
            for tmp in paths:
                tmp.unlink(missing_ok=True)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL file(s)")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--tokenizer-type", required=True, choices=("SentencePieceTokenizer", "HuggingFaceTokenizer"))
    parser.add_argument("--tokenizer-model", required=True)
    parser.add_argument("--append-eod", action="store_true")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--on-bad-lines", choices=("fail", "skip"), default="fail")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--log-interval", type=int, default=None, help="accepted for Megatron compatibility")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    start = time.time()
    try:
        stats = preprocess(args.input, args.output_prefix, tokenizer_type=args.tokenizer_type,
                           tokenizer_model=args.tokenizer_model, json_keys=args.json_keys, append_eod=args.append_eod,
                           workers=args.workers, on_bad_lines=args.on_bad_lines, overwrite=args.overwrite,
                           progress=not args.no_progress)
    except (PreprocessError, FileNotFoundError, ValueError) as err:
        print(f"preprocess_data.py: error: {err}", file=sys.stderr)
        return 2
    elapsed = time.time() - start
    skipped = f", skipped: {stats.bad_summary()}" if stats.bad else ""
    outputs = ", ".join(str(output_paths(args.output_prefix, k)[0].with_suffix("")) for k in args.json_keys)
    print(f"{outputs}: documents={stats.documents}, tokens={stats.tokens}, "
          f"tokens/s={stats.tokens / max(elapsed, 1e-9):.0f}{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
