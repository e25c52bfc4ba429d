"""One megatron-core ``GPTDataset`` per domain (training) plus its held-out validation set.

Each dataset is exactly one epoch of its documents (``num_samples=None``): the DDK mixing sampler
decides how often each domain is visited and reshuffles a domain when it starts a new epoch. Index
caches go to ``cache_dir`` (never next to the data, which may be read-only); with torch.distributed
up, megatron-core's builder lets rank 0 write them while the others wait.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from torch.utils.data import Dataset

from megatron_ddk.data.domains import DomainRegistry


@dataclass(frozen=True)
class DomainData:
    name: str
    train: Dataset
    valid: Dataset


class ConcatSamples(Dataset):
    """Several one-epoch datasets of one domain, back to back."""

    def __init__(self, parts: list[Dataset]):
        self.parts = parts
        self.ends = []
        total = 0
        for part in parts:
            total += len(part)
            self.ends.append(total)

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, index: int):
        part = bisect.bisect_right(self.ends, index)
        start = self.ends[part - 1] if part else 0
        return self.parts[part][index - start]


def _gpt_splits(prefix: str, split: str, *, tokenizer, seq_length: int, seed: int, cache_dir: str):
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
    def built_on_rank() -> bool:
        return True  # every rank reads its own micro-batches (cheap memory-mapped slices)

    builder = BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], built_on_rank, config)
    return builder.build()


def build_domain_datasets(registry: DomainRegistry, *, tokenizer, seq_length: int, seed: int,
                          cache_dir: str) -> list[DomainData]:
    """Train and validation datasets of every domain, in registry order."""
    result = []
    for domain in registry.domains:
        if domain.valid_prefix is not None:
            train_parts = [_gpt_splits(p, "100,0,0", tokenizer=tokenizer, seq_length=seq_length, seed=seed,
                                       cache_dir=cache_dir)[0] for p in domain.train_prefixes]
            valid = _gpt_splits(domain.valid_prefix, "100,0,0", tokenizer=tokenizer, seq_length=seq_length,
                                seed=seed, cache_dir=cache_dir)[0]
        else:
            # megatron's split is over documents: validation never shares a document with training
            fraction = domain.valid_fraction
            split = f"{1.0 - fraction},{fraction},0"
            train_parts, valid_parts = [], []
            for prefix in domain.train_prefixes:
                train, valid, _ = _gpt_splits(prefix, split, tokenizer=tokenizer, seq_length=seq_length, seed=seed,
                                              cache_dir=cache_dir)
                train_parts.append(train)
                valid_parts.append(valid)
            valid = ConcatSamples([v for v in valid_parts if v is not None])
        train_parts = [t for t in train_parts if t is not None]
        train = train_parts[0] if len(train_parts) == 1 else ConcatSamples(train_parts)
        if len(train) == 0 or valid is None or len(valid) == 0:
            raise ValueError(
                f"domain {domain.name!r} has {len(train)} training and {0 if valid is None else len(valid)} validation "
                f"samples of {seq_length + 1} tokens; add data, lower --seq-length or raise its valid_fraction"
            )
        result.append(DomainData(domain.name, train, valid))
    return result
