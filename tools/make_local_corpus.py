"""Build a four-domain JSONL corpus with train / valid / test document splits from real local text.

No generator, no download: every document is text that ships with a Debian machine and a CPython
install, written by people outside this project. The four domains differ in vocabulary and form:

- ``python_stdlib``: function- and class-sized pieces of CPython's standard-library sources
  (``sysconfig``'s stdlib directory, sub-packages included, tests excluded);
- ``changelogs``: release entries of Debian package changelogs (``/usr/share/doc/*/changelog*.gz``);
- ``licenses``: paragraphs of Debian copyright / licence files (``/usr/share/doc/*/copyright``);
- ``manpages``: roff source of manual pages (``/usr/share/man/man*/*.gz``), split at sections.

Documents are de-duplicated by content (licence texts repeat across packages) BEFORE the split, then
shuffled with ``--seed`` and cut into train / valid / test, so no text is in two splits. A source that
is missing on this machine is skipped with a note (the domain is dropped; at least two are needed).
The same seed on the same machine image gives the same files.

Writes ``<out>/<domain>_{train,valid,test}.jsonl`` and ``<out>/domains.yaml`` (docs/DATA.md) pointing
at the ``<domain>_{train,valid,test}_text_document`` datasets ``tools/preprocess_data.py`` creates:

    python tools/make_local_corpus.py --output-dir data/local --size-mb 4 --seed 1234
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

SPLITS = ("train", "valid", "test")
MIN_CHARS, MAX_CHARS = 200, 4000


def _read_gz(path: Path) -> str | None:
    try:
        with gzip.open(path, "rt", encoding="utf-8", errors="strict") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError, EOFError):
        return None


def _chunks(pieces: list[str]) -> Iterator[str]:
    """Group consecutive ``pieces`` into documents of MIN_CHARS..MAX_CHARS characters."""
    current = ""
    for piece in pieces:
        piece = piece.strip("\n")
        if not piece.strip():
            continue
        if len(current) + len(piece) > MAX_CHARS and len(current) >= MIN_CHARS:
            yield current
            current = ""
        current = f"{current}\n\n{piece}" if current else piece
        if len(current) > MAX_CHARS:
            yield current[:MAX_CHARS]
            current = ""
    if len(current) >= MIN_CHARS:
        yield current


def python_stdlib() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).parts
        if any(part in ("test", "tests", "idle_test", "site-packages", "lib2to3") for part in relative):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        lines = source.splitlines()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.end_lineno:
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                piece = "\n".join(lines[start - 1 : node.end_lineno])
                if MIN_CHARS <= len(piece) <= MAX_CHARS:
                    yield piece


def changelogs() -> Iterator[str]:
    for path in sorted(Path("/usr/share/doc").glob("*/changelog*.gz")):
        text = _read_gz(path)
        if not text:
            continue
        # Debian entries end with a " -- maintainer <mail>  date" trailer line; upstream ones are blank-line separated
        entries = re.split(r"(?<=\n) -- [^\n]*\n", text) if "\n -- " in text else text.split("\n\n")
        yield from _chunks(entries)


def licenses() -> Iterator[str]:
    for path in sorted(Path("/usr/share/doc").glob("*/copyright")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        yield from _chunks(text.split("\n\n"))


def manpages() -> Iterator[str]:
    for path in sorted(Path("/usr/share/man").glob("man[1-8]/*.gz")):
        text = _read_gz(path)
        if not text or text.startswith(".so "):  # a link to another page
            continue
        yield from _chunks(re.split(r"\n(?=\.SH )", text))


SOURCES: dict[str, Callable[[], Iterator[str]]] = {
    "python_stdlib": python_stdlib,
    "changelogs": changelogs,
    "licenses": licenses,
    "manpages": manpages,
}


def collect(source: Callable[[], Iterator[str]], rng: random.Random, budget_bytes: int) -> list[str]:
    """Unique documents of one source, shuffled, cut to about ``budget_bytes``."""
    seen: set[bytes] = set()
    documents = []
    for text in source():
        digest = hashlib.sha256(" ".join(text.split()).encode("utf-8")).digest()
        if digest not in seen:
            seen.add(digest)
            documents.append(text)
    rng.shuffle(documents)
    kept, size = [], 0
    for text in documents:
        if size >= budget_bytes:
            break
        kept.append(text)
        size += len(text.encode("utf-8"))
    return kept


def split_documents(
    documents: list[str], valid_fraction: float, test_fraction: float
) -> dict[str, list[str]]:
    n = len(documents)
    n_valid, n_test = max(1, round(n * valid_fraction)), max(1, round(n * test_fraction))
    return {
        "valid": documents[:n_valid],
        "test": documents[n_valid : n_valid + n_test],
        "train": documents[n_valid + n_test :],
    }


def _write_jsonl(path: Path, documents: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for text in documents:
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def registry_yaml(names: list[str]) -> str:
    lines = [
        "# Written by tools/make_local_corpus.py; datasets from tools/preprocess_data.py (docs/DATA.md).",
        "domains:",
    ]
    for name in names:
        lines += [
            f"  - name: {name}",
            f"    train: {name}_train_text_document",
            f"    valid: {name}_valid_text_document",
            f"    test: {name}_test_text_document",
            "    weight: 1.0",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "--size-mb", type=float, default=4.0, help="total size (1 MB = 1e6 bytes), split evenly"
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--valid-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--domains", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    args = parser.parse_args(argv)
    if args.size_mb <= 0:
        parser.error(f"--size-mb must be > 0, got {args.size_mb}")
    if not (
        0 < args.valid_fraction and 0 < args.test_fraction and args.valid_fraction + args.test_fraction < 0.5
    ):
        parser.error("--valid-fraction and --test-fraction must be > 0 and sum to less than 0.5")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    budget = int(args.size_mb * 1e6 / len(args.domains))
    written, summary = [], []
    for index, name in enumerate(args.domains):
        documents = collect(SOURCES[name], random.Random(args.seed * 1000 + index), budget)
        if len(documents) < 30:
            print(
                f"make_local_corpus.py: skipping {name}: only {len(documents)} documents on this machine",
                file=sys.stderr,
            )
            continue
        splits = split_documents(documents, args.valid_fraction, args.test_fraction)
        for split in SPLITS:
            _write_jsonl(out / f"{name}_{split}.jsonl", splits[split])
        written.append(name)
        summary.append(f"{name}=" + "/".join(str(len(splits[s])) for s in SPLITS))
    if len(written) < 2:
        print(
            f"make_local_corpus.py: error: only {len(written)} of the sources exist here; need at least 2",
            file=sys.stderr,
        )
        return 2
    tmp = out / ".domains.yaml.tmp"
    tmp.write_text(registry_yaml(written), encoding="utf-8")
    os.replace(tmp, out / "domains.yaml")
    print(
        f"local corpus in {out} (train/valid/test documents): {', '.join(summary)}; registry {out / 'domains.yaml'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
