"""The domain registry: which indexed datasets make up each domain, its validation data, its weight.

A registry file (YAML or JSON) names the domains DDK balances::

    domains:
      - name: code
        train: [data/code_a_text_document, data/code_b_text_document]   # one prefix or a list
        valid: data/code_valid_text_document    # optional; else a held-out document split:
        valid_fraction: 0.02                    # (default 0.01) never overlaps the training documents
        weight: 1.0                             # initial / static weight, > 0

Relative prefixes resolve against the registry file's directory. Megatron's static
``--data-path W1 PREFIX1 W2 PREFIX2`` form makes one domain per prefix. ``validate_registry`` reports
every problem at once, before any model is built.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_VALID_FRACTION = 0.01


class DataConfigError(ValueError):
    """The data configuration is unusable; one line per problem."""


@dataclass(frozen=True, kw_only=True)
class Domain:
    name: str
    train_prefixes: tuple[str, ...]
    valid_prefix: str | None = None
    valid_fraction: float = DEFAULT_VALID_FRACTION
    weight: float = 1.0


@dataclass(frozen=True)
class DomainRegistry:
    domains: tuple[Domain, ...]
    source: str = "--data-path"
    """Where the registry came from, for error messages."""

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.domains]

    @property
    def initial_weights(self) -> np.ndarray:
        weights = np.array([d.weight for d in self.domains], dtype=np.float64)
        return weights / weights.sum()


def load_domain_registry(path: str | Path) -> DomainRegistry:
    """Read a YAML/JSON registry; structural problems raise ``DataConfigError`` naming the file."""
    path = Path(path)
    if not path.exists():
        raise DataConfigError(f"--domains {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as err:  # yaml and json raise unrelated types
        raise DataConfigError(f"--domains {path}: cannot parse ({err})") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("domains"), list) or not raw["domains"]:
        raise DataConfigError(f"--domains {path}: expected a mapping with a non-empty 'domains:' list")
    problems, domains = [], []
    for index, entry in enumerate(raw["domains"]):
        where = f"--domains {path}: domain #{index + 1}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a mapping with name/train/weight")
            continue
        unknown = set(entry) - {"name", "train", "valid", "valid_fraction", "weight"}
        if unknown:
            problems.append(f"{where}: unknown keys {sorted(unknown)}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            problems.append(f"{where}: missing 'name'")
            continue
        where = f"--domains {path}: domain {name!r}"
        train = entry.get("train")
        train = [train] if isinstance(train, str) else train
        if not train or not all(isinstance(p, str) for p in train):
            problems.append(f"{where}: 'train' must be a dataset prefix or a list of prefixes")
            continue
        weight = entry.get("weight", 1.0)
        valid_fraction = entry.get("valid_fraction", DEFAULT_VALID_FRACTION)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            problems.append(f"{where}: weight {weight!r} is not a number")
            continue
        if not isinstance(valid_fraction, (int, float)) or isinstance(valid_fraction, bool):
            problems.append(f"{where}: valid_fraction {valid_fraction!r} is not a number")
            continue
        valid = entry.get("valid")
        domains.append(Domain(
            name=name,
            train_prefixes=tuple(_resolve(path.parent, p) for p in train),
            valid_prefix=_resolve(path.parent, valid) if valid else None,
            valid_fraction=float(valid_fraction),
            weight=float(weight),
        ))
    if problems:
        raise DataConfigError("\n".join(problems))
    return DomainRegistry(tuple(domains), source=f"--domains {path}")


def registry_from_data_path(tokens: list[str]) -> DomainRegistry:
    """Megatron's ``--data-path [W1] PREFIX1 [W2] PREFIX2 ...``: one domain per prefix."""
    if not tokens:
        raise DataConfigError("--data-path is empty: give [W1] PREFIX1 [W2 PREFIX2 ...]")
    weighted = _is_number(tokens[0])
    if weighted and len(tokens) % 2:
        raise DataConfigError(f"--data-path {' '.join(tokens)}: weights and prefixes must alternate (W1 P1 W2 P2 ...)")
    pairs = ([(float(tokens[i]), tokens[i + 1]) for i in range(0, len(tokens), 2)] if weighted
             else [(1.0, t) for t in tokens])
    problems = [f"--data-path: {p!r} where a weight was expected" for w, p in pairs if weighted and _is_number(p)]
    if problems:
        raise DataConfigError("\n".join(problems))
    domains = []
    for weight, prefix in pairs:
        name = Path(prefix).name
        for suffix in ("_text_document", "_document"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        domains.append(Domain(name=name, train_prefixes=(prefix,), weight=weight))
    return DomainRegistry(tuple(domains), source="--data-path")


def validate_registry(registry: DomainRegistry, *, vocab_size: int) -> None:
    """Check files, weights, names, splits and token ids; raise once with every problem found."""
    problems = []
    where = registry.source
    if not registry.domains:
        problems.append(f"{where}: no domains")
    seen = set()
    for domain in registry.domains:
        if domain.name in seen:
            problems.append(f"{where}: duplicate domain name {domain.name!r}; names must be unique")
        seen.add(domain.name)
        if not math.isfinite(domain.weight) or domain.weight <= 0:
            problems.append(f"{where}: domain {domain.name!r} has weight {domain.weight}; weights must be > 0")
        if domain.valid_prefix is None and not 0 < domain.valid_fraction < 1:
            problems.append(f"{where}: domain {domain.name!r} has valid_fraction {domain.valid_fraction}; "
                            "it must be in (0, 1), or give a 'valid' prefix")
        prefixes = list(domain.train_prefixes) + ([domain.valid_prefix] if domain.valid_prefix else [])
        for prefix in prefixes:
            missing = [f"{prefix}{ext}" for ext in (".bin", ".idx") if not Path(f"{prefix}{ext}").exists()]
            if missing:
                problems.append(f"{where}: domain {domain.name!r}: missing {' and '.join(missing)}; "
                                "create it with tools/preprocess_data.py")
                continue
            max_id = max_token_id(prefix)
            if max_id >= vocab_size:
                problems.append(f"{where}: domain {domain.name!r}: {prefix} holds token id {max_id} but the tokenizer "
                                f"has {vocab_size} tokens; it was preprocessed with another tokenizer")
    if problems:
        raise DataConfigError("\n".join(problems))


def max_token_id(prefix: str, chunk: int = 1 << 24) -> int:
    """Largest token id in an indexed dataset, read in chunks from the memory-mapped .bin."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix, mmap=True)
    tokens = np.memmap(f"{prefix}.bin", dtype=dataset.index.dtype, mode="r")
    if tokens.size == 0:
        return -1
    return int(max(tokens[i: i + chunk].max() for i in range(0, tokens.size, chunk)))


def _resolve(base: Path, prefix: str) -> str:
    path = Path(prefix)
    return str(path if path.is_absolute() else base / path)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
