"""The domain registry: which indexed datasets make up each domain, its validation data, its weight.

A registry file (YAML, or JSON by its ``.json`` extension) names the domains DDK balances::

    domains:
      - name: code
        train: [data/code_a_text_document, data/code_b_text_document]   # one prefix or a list
        valid: data/code_valid_text_document    # optional; else a held-out document split:
        valid_fraction: 0.02                    # (default 0.01) never shares a document with training
        test: data/code_test_text_document      # optional test set (never read by training or DDK), or:
        test_fraction: 0.02                     # hold out the last 2% of the training documents
        weight: 1.0                             # initial / static weight, > 0

Relative prefixes resolve against the registry file's directory (stored absolute). Megatron's static
``--data-path [W1] PREFIX1 [W2] PREFIX2 ...`` form makes one domain per prefix. Loading reports every
structural problem of a file at once; ``validate_registry`` then reports every problem with the data
itself (missing files, weights, splits, token ids) at once, before any model is built.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_ddk.errors import DataError

DEFAULT_VALID_FRACTION = 0.01
DOCUMENT_SUFFIXES = ("_text_document", "_document")
"""Stripped from a prefix's file name to name its domain in the ``--data-path`` form."""
_KEYS = ("name", "train", "valid", "valid_fraction", "test", "test_fraction", "weight")


class DataConfigError(DataError, ValueError):
    """The data configuration is unusable; one line per problem."""


@dataclass(frozen=True, kw_only=True)
class Domain:
    name: str
    train_prefixes: tuple[str, ...]
    """Indexed-dataset prefixes (``<prefix>.bin/.idx``) whose documents are this domain's training data."""
    valid_prefix: str | None = None
    """A separate validation dataset; when None, ``valid_fraction`` of the training documents is held out."""
    valid_fraction: float = DEFAULT_VALID_FRACTION
    test_prefix: str | None = None
    """A separate test dataset (held-out evaluation: ``tools/evaluate.py --split test``); never trained on."""
    test_fraction: float = 0.0
    """Without ``test_prefix``: this fraction of the training documents (the last ones) is held out as test."""
    weight: float = 1.0
    """Initial (DDK) or fixed (static mixing) sampling weight; normalized over domains."""


@dataclass(frozen=True, kw_only=True)
class DomainRegistry:
    domains: tuple[Domain, ...]
    source: str = "--data-path"
    """Where the registry came from (flag and file), named in every error message."""

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.domains]

    @property
    def has_test_split(self) -> bool:
        return all(d.test_prefix is not None or d.test_fraction > 0 for d in self.domains)

    @property
    def initial_weights(self) -> np.ndarray:
        """Normalized weights, float64 [num_domains]."""
        weights = np.array([d.weight for d in self.domains], dtype=np.float64)
        return weights / weights.sum()


def load_domain_registry(path: str | Path) -> DomainRegistry:
    """Read a YAML/JSON registry; structural problems raise one ``DataConfigError`` naming the file."""
    path = Path(path).expanduser()
    where = f"--domains {path}"
    if not path.is_file():
        raise DataConfigError(
            f"{where}: no such file; give the domain registry (YAML or JSON), see docs/DATA.md"
        )
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as err:  # json, yaml and decoding raise unrelated types
        message = " ".join(str(err).split())
        raise DataConfigError(f"{where}: cannot parse ({message})") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("domains"), list) or not raw["domains"]:
        raise DataConfigError(
            f"{where}: expected a mapping with a non-empty 'domains:' list, see docs/DATA.md"
        )
    unknown_top = sorted(set(raw) - {"domains"})
    problems = (
        [f"{where}: unknown top-level keys {unknown_top}; only 'domains' is read"] if unknown_top else []
    )
    domains = []
    for index, entry in enumerate(raw["domains"]):
        domain, entry_problems = _parse_domain(entry, where, index, path.resolve().parent)
        problems += entry_problems
        if domain is not None:
            domains.append(domain)
    if problems:
        raise DataConfigError("\n".join(problems))
    return DomainRegistry(domains=tuple(domains), source=where)


def _parse_domain(entry: object, source: str, index: int, base: Path) -> tuple[Domain | None, list[str]]:
    where = f"{source}: domain #{index + 1}"
    if not isinstance(entry, dict):
        return None, [
            f"{where}: expected a mapping with keys name, train and optionally valid, valid_fraction, weight"
        ]
    problems = []
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{where}: 'name' must be a non-empty string")
    else:
        where = f"{source}: domain {name!r}"
    unknown = sorted(set(entry) - set(_KEYS))
    if unknown:
        problems.append(f"{where}: unknown keys {unknown}; allowed: {', '.join(_KEYS)}")
    train = entry.get("train")
    train = [train] if isinstance(train, str) else train
    if not isinstance(train, list) or not train or not all(isinstance(p, str) and p for p in train):
        problems.append(f"{where}: 'train' must be a dataset prefix or a non-empty list of prefixes")
    valid = entry.get("valid")
    if valid is not None and (not isinstance(valid, str) or not valid):
        problems.append(f"{where}: 'valid' must be one dataset prefix")
    if valid is not None and "valid_fraction" in entry:
        problems.append(f"{where}: give either 'valid' or 'valid_fraction', not both")
    test = entry.get("test")
    if test is not None and (not isinstance(test, str) or not test):
        problems.append(f"{where}: 'test' must be one dataset prefix")
    if test is not None and "test_fraction" in entry:
        problems.append(f"{where}: give either 'test' or 'test_fraction', not both")
    weight = entry.get("weight", 1.0)
    valid_fraction = entry.get("valid_fraction", DEFAULT_VALID_FRACTION)
    test_fraction = entry.get("test_fraction", 0.0)
    for key, value in (
        ("weight", weight),
        ("valid_fraction", valid_fraction),
        ("test_fraction", test_fraction),
    ):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            problems.append(f"{where}: {key} {value!r} is not a number")
    if problems or not isinstance(name, str) or not isinstance(train, list):
        return None, problems
    return Domain(
        name=name,
        train_prefixes=tuple(_resolve(base, p) for p in train),
        valid_prefix=_resolve(base, valid) if valid else None,
        valid_fraction=float(valid_fraction),
        test_prefix=_resolve(base, test) if test else None,
        test_fraction=float(test_fraction),
        weight=float(weight),
    ), []


def registry_from_data_path(tokens: list[str] | tuple[str, ...]) -> DomainRegistry:
    """Megatron's ``--data-path [W1] PREFIX1 [W2] PREFIX2 ...``: one domain per prefix.

    A domain is named after its prefix's file name without ``_text_document``; two prefixes with the same
    name are an error (rename the files or write a registry).
    """
    tokens = [str(t) for t in tokens]
    if not tokens:
        raise DataConfigError("--data-path is empty: give [W1] PREFIX1 [W2 PREFIX2 ...]")
    weighted = _is_number(tokens[0])
    if weighted and len(tokens) % 2:
        raise DataConfigError(
            f"--data-path {' '.join(tokens)}: weights and prefixes must alternate (W1 P1 W2 P2 ...)"
        )
    if weighted:
        pairs = [(tokens[i], tokens[i + 1]) for i in range(0, len(tokens), 2)]
    else:
        pairs = [("1.0", t) for t in tokens]
    problems = []
    for weight, prefix in pairs:
        if not _is_number(weight):
            problems.append(
                f"--data-path: {weight!r} where a weight was expected; either give a weight before "
                "every prefix or none at all"
            )
        if _is_number(prefix):
            problems.append(f"--data-path: {prefix!r} where a dataset prefix was expected")
    names: dict[str, list[str]] = {}
    for _, prefix in pairs:
        names.setdefault(domain_name_for_prefix(prefix), []).append(prefix)
    for name, prefixes in names.items():
        if len(prefixes) > 1:
            problems.append(
                f"--data-path: prefixes {', '.join(prefixes)} would all be domain {name!r}; rename the "
                "files or describe the domains in a --domains registry"
            )
    if problems:
        raise DataConfigError("\n".join(problems))
    domains = tuple(
        Domain(name=domain_name_for_prefix(p), train_prefixes=(str(Path(p).expanduser()),), weight=float(w))
        for w, p in pairs
    )
    return DomainRegistry(domains=domains, source="--data-path")


def domain_name_for_prefix(prefix: str) -> str:
    name = Path(prefix).name
    for suffix in DOCUMENT_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def validate_registry(registry: DomainRegistry, *, vocab_size: int, scan_token_ids: bool = True) -> None:
    """Check names, weights, splits, files and token ids; raise ``DataConfigError`` once with all problems.

    ``scan_token_ids=False`` skips the one check that reads every token (the largest id against the
    vocabulary): a multi-process job lets one rank read the data instead of all of them.
    """
    where = registry.source
    problems = []
    if not registry.domains:
        problems.append(f"{where}: no domains; list at least one")
    seen: set[str] = set()
    checked: dict[str, str | None] = {}  # prefix -> its problem (a prefix may serve several domains)
    for domain in registry.domains:
        at = f"{where}: domain {domain.name!r}"
        if domain.name in seen:
            problems.append(f"{where}: duplicate domain name {domain.name!r}; names must be unique")
        seen.add(domain.name)
        if not math.isfinite(domain.weight) or domain.weight <= 0:
            problems.append(f"{at}: weight {domain.weight} must be a finite number > 0")
        if domain.valid_prefix is None and not 0 < domain.valid_fraction < 1:
            problems.append(
                f"{at}: valid_fraction {domain.valid_fraction} must be in (0, 1), or give a 'valid' prefix"
            )
        if domain.valid_prefix is not None and domain.valid_prefix in domain.train_prefixes:
            problems.append(
                f"{at}: valid prefix {domain.valid_prefix} is also a training prefix; validation "
                "data must be held out (drop 'valid' to split off valid_fraction instead)"
            )
        problems += _test_split_problems(domain, at)
        extra = tuple(p for p in (domain.valid_prefix, domain.test_prefix) if p)
        prefixes = list(dict.fromkeys(domain.train_prefixes + extra))
        for prefix in prefixes:
            if prefix not in checked:
                checked[prefix] = _check_dataset(prefix, vocab_size if scan_token_ids else None)
            if checked[prefix]:
                problems.append(f"{at}: {checked[prefix]}")
    if problems:
        raise DataConfigError("\n".join(problems))


def _test_split_problems(domain: Domain, at: str) -> list[str]:
    """The test split must be held out from training and validation (checked by prefix; the document
    contents are compared by ``check_test_documents_disjoint``)."""
    problems = []
    held_out = (domain.valid_fraction if domain.valid_prefix is None else 0.0) + domain.test_fraction
    if (
        domain.test_prefix is None
        and domain.test_fraction != 0
        and not (0 < domain.test_fraction and held_out < 1)
    ):
        problems.append(
            f"{at}: test_fraction {domain.test_fraction} must be in [0, 1) and leave training "
            "documents (with valid_fraction)"
        )
    test = domain.test_prefix and os.path.realpath(domain.test_prefix)
    if test and test in {os.path.realpath(p) for p in domain.train_prefixes}:
        problems.append(
            f"{at}: test prefix {domain.test_prefix} is also a training prefix; the test split "
            "must be held out (drop 'test' and use test_fraction instead)"
        )
    if test and domain.valid_prefix and test == os.path.realpath(domain.valid_prefix):
        problems.append(
            f"{at}: test prefix {domain.test_prefix} is also the 'valid' prefix; DDK reads the "
            "validation set, so the test set must be a different one"
        )
    return problems


def check_test_documents_disjoint(registry: DomainRegistry) -> None:
    """Refuse (``DataConfigError``, one line per domain) a separate ``test`` dataset sharing a document
    with the domain's training or validation datasets: compares the token sequences by hash."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    def digests(prefix: str) -> set[bytes]:
        dataset = IndexedDataset(prefix, mmap=True)
        return {hashlib.sha1(np.asarray(dataset[i]).tobytes()).digest() for i in range(len(dataset))}

    problems = []
    for domain in registry.domains:
        if domain.test_prefix is None:
            continue  # a test_fraction is a document split of the training prefixes: disjoint by construction
        test = digests(domain.test_prefix)
        others = domain.train_prefixes + ((domain.valid_prefix,) if domain.valid_prefix else ())
        shared = sum(len(test & digests(p)) for p in others)
        if shared:
            problems.append(
                f"{registry.source}: domain {domain.name!r}: test set {domain.test_prefix} shares "
                f"{shared} documents with its training/validation data; rebuild the splits without "
                "overlap (e.g. tools/make_local_corpus.py de-duplicates before splitting)"
            )
    if problems:
        raise DataConfigError("\n".join(problems))


def _check_dataset(prefix: str, vocab_size: int | None) -> str | None:
    """The problem with one indexed dataset, or None; ``vocab_size`` None: do not read the tokens."""
    missing = [f"{prefix}{ext}" for ext in (".bin", ".idx") if not Path(f"{prefix}{ext}").is_file()]
    if missing:
        return f"missing {' and '.join(missing)}; create it with tools/preprocess_data.py"
    if os.path.getsize(f"{prefix}.bin") == 0:  # megatron-core cannot memory-map an empty file
        return f"{prefix} holds no documents; re-run tools/preprocess_data.py on non-empty input"
    try:
        num_documents, max_id = dataset_summary(prefix, scan_tokens=vocab_size is not None)
    except Exception as err:  # a truncated or foreign file fails deep inside numpy/megatron
        return f"cannot read {prefix}.bin/.idx ({type(err).__name__}: {err}); re-run tools/preprocess_data.py"
    if num_documents == 0:
        return f"{prefix} holds no documents; re-run tools/preprocess_data.py on non-empty input"
    if vocab_size is not None and max_id >= vocab_size:
        return (
            f"{prefix} holds token id {max_id} but the tokenizer has {vocab_size} tokens; it was "
            "preprocessed with another tokenizer (check --tokenizer-model)"
        )
    return None


def dataset_summary(prefix: str, chunk_tokens: int = 1 << 24, *, scan_tokens: bool = True) -> tuple[int, int]:
    """(number of sequences, largest token id or -1) of an indexed dataset; reads the .bin in chunks
    (``scan_tokens=False``: checks only that .bin and .idx agree in size, and returns -1)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix, mmap=True)
    dtype = np.dtype(dataset.index.dtype)
    expected = int(dataset.index.sequence_lengths.sum(dtype=np.int64))
    size = os.path.getsize(f"{prefix}.bin")
    if size != expected * dtype.itemsize:
        raise DataError(
            f"{prefix}.bin has {size} bytes but its .idx describes {expected} {dtype.name} tokens"
        )
    if expected == 0 or not scan_tokens:
        return len(dataset), -1
    tokens = np.memmap(f"{prefix}.bin", dtype=dtype, mode="r")
    max_id = -1
    for start in range(0, tokens.size, chunk_tokens):
        max_id = max(max_id, int(tokens[start : start + chunk_tokens].max()))
    return len(dataset), max_id


def _resolve(base: Path, prefix: str) -> str:
    return os.path.normpath(base / Path(prefix).expanduser())  # base is absolute; an absolute prefix wins


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
