"""Two ranks build the per-domain datasets into one shared cache (rank 0 writes, rank 1 waits and reads).

Usage: build_domain_datasets.py REGISTRY TOKENIZER_DIR CACHE_DIR OUT_JSON. Rank 0 writes to OUT_JSON,
for every rank: per domain the train/valid sizes and the token ids of the first samples.
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist


def main(registry_path: str, tokenizer_dir: str, cache_dir: str, out_path: str) -> None:
    from megatron_ddk.data.datasets import build_domain_datasets
    from megatron_ddk.data.domains import load_domain_registry
    from megatron_ddk.data.tokenizer import build_tokenizer
    from megatron_ddk.platform.distributed import ParallelLayout, destroy, initialize

    initialize(ParallelLayout(world_size=2))
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir)
    domains = build_domain_datasets(
        load_domain_registry(registry_path), tokenizer=tokenizer, seq_length=8, seed=5, cache_dir=cache_dir
    )
    result = {
        d.name: {
            "train": len(d.train),
            "valid": len(d.valid),
            "first": [d.train[i]["tokens"].tolist() for i in range(3)],
        }
        for d in domains
    }
    results = [None, None]
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle)
    destroy()


if __name__ == "__main__":
    main(*sys.argv[1:5])
