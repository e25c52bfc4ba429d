"""One megatron-core ``GPTDataset`` per domain for training, plus the domain's held-out validation set.

Each dataset is exactly one epoch of its documents (``num_samples=None``): the DDK mixing sampler
decides how often each domain is visited and reshuffles a domain when it starts a new epoch. A
domain with several training prefixes concatenates their one-epoch datasets. Without a ``valid``
prefix, megatron-core's document-level split holds out the last ``valid_fraction`` of each prefix's
documents, so training and validation never share a document.

Index caches go to ``cache_dir`` (never next to the data, which may be read-only). With
torch.distributed up, megatron-core's builder lets global rank 0 write them while the other ranks
wait at a barrier, then read them: every rank must call ``build_domain_datasets`` with the same registry.
"""

from __future__ import annotations

import bisect
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

from torch.utils.data import Dataset

from megatron_ddk.data.domains import Domain, DomainRegistry
from megatron_ddk.errors import DataError

_PAD_CLASH_WARNING = "The pad token id in the tokenizer collides"
"""megatron-core warns when pad == eod and then pads with -1, which is what we want (see tokenizer.py)."""


class Samples(Protocol):
    """What the sampler and the loaders need of a dataset: a length and indexed samples."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclass(frozen=True)
class DomainData:
    """A domain's datasets; items are GPTDataset samples: tokens, labels, loss_mask, position_ids [s]."""

    name: str
    train: Samples
    valid: Samples
    test: Samples | None = None
    """Only when the registry gives the domain a test split (``test`` / ``test_fraction``)."""


class ConcatSamples(Dataset[dict[str, Any]]):
    """Several one-epoch datasets of one domain, back to back."""

    def __init__(self, parts: list[Samples]):
        self.parts = list(parts)
        self.ends: list[int] = []
        total = 0
        for part in self.parts:
            total += len(part)
            self.ends.append(total)

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        part = bisect.bisect_right(self.ends, index)
        start = self.ends[part - 1] if part else 0
        return self.parts[part][index - start]


def split_string(valid_fraction: float, test_fraction: float = 0.0) -> str:
    """megatron's "train,valid,test" split string, fixed-point: megatron's parser cannot read ``1e-05``."""
    test = f"{test_fraction:.10f}" if test_fraction > 0 else "0"
    return f"{1.0 - valid_fraction - test_fraction:.10f},{valid_fraction:.10f},{test}"


def _build_splits(
    prefix: str, split: str, *, tokenizer: Any, seq_length: int, seed: int, cache_dir: str
) -> list[Any]:
    """[train, valid, test] GPTDatasets (None where a split is empty) of one prefix, one epoch each."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prefix], None),
        split=split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=cache_dir,
        mid_level_dataset_surplus=0.0,
    )
    # Every rank reads its own micro-batches (cheap memory-mapped slices), so every rank builds;
    # the builder still orders the ranks: rank 0 writes the cache, the others wait and read it.
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], lambda: True, config)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PAD_CLASH_WARNING)
        return builder.build()


def _split_document_counts(num_documents: int, valid_fraction: float) -> tuple[int, int]:
    """(train, valid) documents megatron's split gives: it rounds the book-ends of each split."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split_string(valid_fraction)))
    counts = [
        0 if b is None else int(round(b[1] * num_documents)) - int(round(b[0] * num_documents))
        for b in matrix
    ]
    return counts[0], counts[1]


def _check_split(domain: Domain, prefix: str) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    num_documents = len(IndexedDataset(prefix, mmap=True))
    train_docs, valid_docs = _split_document_counts(num_documents, domain.valid_fraction)
    if train_docs == 0 or valid_docs == 0:
        raise DataError(
            f"domain {domain.name!r}: valid_fraction {domain.valid_fraction} of the {num_documents} "
            f"documents in {prefix} leaves {train_docs} for training and {valid_docs} for validation; "
            "add documents, change valid_fraction or give a separate 'valid' prefix"
        )


def build_domain_datasets(
    registry: DomainRegistry, *, tokenizer: Any, seq_length: int, seed: int, cache_dir: str
) -> list[DomainData]:
    """Train and validation datasets of every domain, in registry order; deterministic in ``seed``.

    Samples hold ``seq_length`` tokens (GPTDataset reads ``seq_length + 1`` and shifts the labels).
    Raises DataError naming the domain when a split would be empty.
    """
    if seq_length < 1:
        raise DataError(f"--seq-length must be >= 1, got {seq_length}")
    result = []
    for domain in registry.domains:
        if domain.valid_prefix is None:
            for prefix in domain.train_prefixes:
                _check_split(domain, prefix)
        common = dict(tokenizer=tokenizer, seq_length=seq_length, seed=seed, cache_dir=str(cache_dir))
        train_parts, valid_parts, test_parts = [], [], []
        held_test = domain.test_fraction if domain.test_prefix is None else 0.0
        for prefix in domain.train_prefixes:
            if domain.valid_prefix is None:
                train, valid, test = _build_splits(
                    prefix, split_string(domain.valid_fraction, held_test), **common
                )
                valid_parts.append(valid)
            else:
                train, _, test = _build_splits(
                    prefix, split_string(0.0, held_test) if held_test else "1,0,0", **common
                )
            train_parts.append(train)
            test_parts.append(test)
        if domain.valid_prefix is not None:
            valid_parts.append(_build_splits(domain.valid_prefix, "0,1,0", **common)[1])
        if domain.test_prefix is not None:
            test_parts = [_build_splits(domain.test_prefix, "0,0,1", **common)[2]]
        train, valid = _join(train_parts), _join(valid_parts)
        test = _join(test_parts) if any(p is not None for p in test_parts) else None
        if len(train) == 0 or len(valid) == 0:
            raise DataError(
                f"domain {domain.name!r} has {len(train)} training and {len(valid)} validation samples of "
                f"{seq_length} tokens; add data, lower --seq-length or raise its valid_fraction"
            )
        if (domain.test_prefix is not None or domain.test_fraction > 0) and (test is None or len(test) == 0):
            raise ValueError(
                f"domain {domain.name!r} has no test samples of {seq_length} tokens; add data, lower "
                "--seq-length or raise its test_fraction"
            )
        result.append(DomainData(domain.name, train, valid, test))
    return result


def _join(parts: list[Any]) -> Samples:
    parts = [p for p in parts if p is not None]
    return parts[0] if len(parts) == 1 else ConcatSamples(parts)
