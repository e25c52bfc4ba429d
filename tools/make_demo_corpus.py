"""Write a small multi-domain JSONL corpus from text every Python 3.11 install carries, plus synthetic data.

Domains (deliberately unlike each other, so a small model's per-domain perplexities differ):

- ``python_code``: function- and class-sized pieces of the standard library's own sources;
- ``prose``: English paragraphs of CPython's bundled reference documentation (``pydoc_data.topics``),
  then of the standard library's docstrings;
- ``arithmetic``: synthetic sums, differences and products ("417 * 23 = 9591");
- ``records``: synthetic JSON records (people, orders, sensor readings).

No download; the same seed on the same Python version gives the same files. Also writes
``domains.yaml`` (the registry pretrain_ddk.py reads) pointing at the ``<domain>_text_document``
datasets tools/preprocess_data.py creates in the same directory:

    python tools/make_demo_corpus.py --output-dir data/demo --size-mb 3
    for d in python_code prose arithmetic records; do
      python tools/preprocess_data.py --input data/demo/$d.jsonl --output-prefix data/demo/$d \\
          --tokenizer-type SentencePieceTokenizer --tokenizer-model data/demo/tok.model --append-eod
    done
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path

DOMAINS = ("python_code", "prose", "arithmetic", "records")


def _stdlib_modules(rng: random.Random) -> Iterator[tuple[str, ast.Module]]:
    """(source, syntax tree) of the top-level standard-library modules, in a seeded order."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rng.shuffle(files)
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            yield source, ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue


def python_code(rng: random.Random) -> Iterator[str]:
    for source, tree in _stdlib_modules(rng):
        lines = source.splitlines()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.end_lineno:
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                piece = "\n".join(lines[start - 1 : node.end_lineno])
                if 80 <= len(piece) <= 6000:
                    yield piece


def _is_running_english(paragraph: str) -> bool:
    """Long enough and mostly letters and spaces: not a code listing, table or signature."""
    return len(paragraph) >= 120 and sum(c.isalpha() or c == " " for c in paragraph) / len(paragraph) > 0.8


def prose(rng: random.Random) -> Iterator[str]:
    from pydoc_data import topics

    texts = [text for _, text in sorted(topics.topics.items())]
    rng.shuffle(texts)
    for text in texts:
        for paragraph in text.split("\n\n"):
            paragraph = " ".join(paragraph.split())
            if _is_running_english(paragraph):
                yield paragraph
    for _, tree in _stdlib_modules(rng):
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                continue
            docstring = ast.get_docstring(node) or ""
            paragraphs = [" ".join(p.split()) for p in docstring.split("\n\n")]
            text = "\n\n".join(p for p in paragraphs if _is_running_english(p))
            if text:
                yield text


def arithmetic(rng: random.Random) -> Iterator[str]:
    while True:
        problems = []
        for _ in range(rng.randint(4, 12)):
            a, b = rng.randint(0, 9999), rng.randint(1, 999)
            op = rng.choice("+-*")
            value = a + b if op == "+" else a - b if op == "-" else a * b
            problems.append(f"{a} {op} {b} = {value}")
        yield "\n".join(problems)


def records(rng: random.Random) -> Iterator[str]:
    first = ["ada", "alan", "grace", "edsger", "barbara", "donald", "frances", "john", "margaret", "ken"]
    cities = ["oslo", "lima", "pune", "kyoto", "accra", "quito", "perth", "tunis", "hanoi", "bergen"]
    while True:
        kind = rng.choice(["person", "order", "reading"])
        rows = []
        for _ in range(rng.randint(2, 6)):
            if kind == "person":
                row = {
                    "id": rng.randint(1, 99999),
                    "name": rng.choice(first),
                    "city": rng.choice(cities),
                    "age": rng.randint(18, 90),
                    "active": rng.random() < 0.5,
                }
            elif kind == "order":
                row = {
                    "order": rng.randint(10000, 99999),
                    "items": rng.randint(1, 9),
                    "total": round(rng.uniform(1, 500), 2),
                    "currency": rng.choice(["EUR", "USD", "JPY"]),
                }
            else:
                row = {
                    "sensor": f"s{rng.randint(1, 64):02d}",
                    "t": rng.randint(0, 86399),
                    "celsius": round(rng.gauss(18, 7), 1),
                    "ok": rng.random() < 0.95,
                }
            rows.append(json.dumps(row, sort_keys=True))
        yield "\n".join(rows)


GENERATORS: dict[str, Callable[[random.Random], Iterator[str]]] = {
    "python_code": python_code,
    "prose": prose,
    "arithmetic": arithmetic,
    "records": records,
}


def write_domain(path: Path, documents: Iterator[str], budget_bytes: int) -> tuple[int, int]:
    """Write ``{"text": ...}`` lines until ``budget_bytes`` or the source runs out; atomic (temp file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    count = size = 0
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            for text in documents:
                if size >= budget_bytes:
                    break
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                handle.write(line)
                count += 1
                size += len(line.encode("utf-8"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count, size


def registry_yaml(names: tuple[str, ...], valid_fraction: float, test_fraction: float = 0.0) -> str:
    lines = [
        "# Written by tools/make_demo_corpus.py; the datasets come from tools/preprocess_data.py.",
        "# Format: docs/DATA.md. Relative prefixes resolve against this file's directory.",
        "domains:",
    ]
    for name in names:
        lines += [
            f"  - name: {name}",
            f"    train: {name}_text_document",
            f"    valid_fraction: {valid_fraction}",
            *([f"    test_fraction: {test_fraction}"] if test_fraction else []),
            "    weight: 1.0",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "--size-mb", type=float, default=3.0, help="total size (1 MB = 1e6 bytes), split evenly"
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--valid-fraction", type=float, default=0.05, help="written into domains.yaml")
    parser.add_argument(
        "--test-fraction", type=float, default=0.0, help="held-out test documents (domains.yaml); 0: none"
    )
    args = parser.parse_args(argv)
    if args.size_mb <= 0:
        parser.error(f"--size-mb must be > 0, got {args.size_mb}")
    if not 0 < args.valid_fraction < 1:
        parser.error(f"--valid-fraction must be in (0, 1), got {args.valid_fraction}")
    if not 0 <= args.test_fraction < 1 - args.valid_fraction:
        parser.error(f"--test-fraction must be in [0, 1 - --valid-fraction), got {args.test_fraction}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    budget = int(args.size_mb * 1e6 / len(DOMAINS))
    summary = []
    for index, name in enumerate(DOMAINS):
        rng = random.Random(args.seed * 1000 + index)
        count, size = write_domain(out / f"{name}.jsonl", GENERATORS[name](rng), budget)
        summary.append(f"{name}={count} docs/{size / 1e6:.2f} MB")
    tmp = out / ".domains.yaml.tmp"
    tmp.write_text(registry_yaml(DOMAINS, args.valid_fraction, args.test_fraction), encoding="utf-8")
    os.replace(tmp, out / "domains.yaml")
    print(
        f"demo corpus in {out}: {', '.join(summary)}; registry {out / 'domains.yaml'} "
        f"({time.time() - start:.1f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
