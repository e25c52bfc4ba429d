"""What a ``--teacher-cache`` run pays before its first iteration, step by step, on a cache made here.

    python benchmarks/cache_startup.py --work-dir /tmp/cache_startup              # ~400 MB cache
    python benchmarks/cache_startup.py --work-dir /tmp/cache_startup --samples 2000 --seq-length 2048

The cache has the tool's index and sample plans (``tools/cache_teacher_logits.py``: ``prepare_index``)
and shards written by ``teacher_cache.write_shard`` in the layout of a large-vocabulary teacher (int32
ids); their contents are zeros (the checks cost the same whatever the bytes). Timed, as
``CachedTeacher`` and ``check_coverage`` run them (``distill/teacher_source.py``):

- opening the cache (``TeacherCache``: the index, the sha256 of every sample plan, every shard's size,
  the (split, domain) -> (shard, row) maps over all samples of the datasets);
- the coverage computation of a paper-scale run (``samples_a_run_can_draw``) and the lookups of what it
  can draw (``missing``, ``shards_holding``);
- sha256 of every shard (what ``_verify`` splits over the ranks), as MB/s of one core;
- the identity: sha256 of the datasets' ``.idx`` files (every rank hashes all of them) at that rate.

The files were just written, so hashing reads the page cache (CPU-bound); on a cluster file system
the read bandwidth may be the limit instead. Times are this process's CPU time (one thread). The extrapolation to a large cache is printed last.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def timed(fn):
    """(result, CPU seconds of this process): on a shared machine the CPU time is the work, wall time is not."""
    start = time.process_time()
    result = fn()
    return result, time.process_time() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, required=True)
    p.add_argument("--samples", type=int, default=1024, help="cached training samples (over all domains)")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard (the tool's default)")
    p.add_argument(
        "--domain-samples", type=int, default=1_800_000, help="training samples per domain of the datasets"
    )
    p.add_argument("--domains", type=int, default=4)
    p.add_argument("--train-iters", type=int, default=30000, help="the run whose draws are computed")
    p.add_argument("--global-batch-size", type=int, default=256)
    p.add_argument("--ddk-interval", type=int, default=1000)
    p.add_argument("--target-tb", type=float, default=2.0, help="extrapolate to a cache of this size")
    p.add_argument("--ranks", type=int, default=64)
    p.add_argument(
        "--idx-gb", type=float, default=0.3, help=".idx bytes of the datasets (GB) to extrapolate to"
    )
    args = p.parse_args()

    import cache_teacher_logits as tool

    from megatron_ddk.data.coverage import RunDraws, samples_a_run_can_draw
    from megatron_ddk.distill import teacher_cache as tc

    out = args.work_dir / "cache"
    shutil.rmtree(out, ignore_errors=True)
    layout = tc.CacheLayout.for_vocabulary(
        seq_length=args.seq_length, top_k=args.top_k, vocab_size=args.vocab
    )
    sizes = [args.domain_samples] * args.domains
    domains = [SimpleNamespace(name=f"d{d}", train=range(n), valid=range(64)) for d, n in enumerate(sizes)]
    per_domain = args.samples // args.domains
    rng = np.random.default_rng(0)
    chosen = {("train", d): np.sort(rng.choice(n, per_domain, replace=False)) for d, n in enumerate(sizes)}
    index = tool.prepare_index(
        out,
        identity={"benchmark": True},
        layout=layout,
        domains=domains,
        chosen=chosen,
        shard_size=args.shard_size,
        built_with={},
    )
    plans = {key: np.load(out / plan["file"], allow_pickle=False) for key, plan in index["plans"].items()}
    start = time.perf_counter()
    for shard in index["shards"]:
        rows = shard["stop"] - shard["start"]
        ids = plans[f"{shard['split']}-d{shard['domain']:03d}"][shard["start"] : shard["stop"]]
        arrays = {name: np.zeros((rows, *shape), dtype) for name, dtype, shape in layout.fields()}
        arrays["sample_id"] = ids
        shard["sha256"] = tc.write_shard(out / shard["file"], layout, arrays)
    tc.write_index(out, index)
    written = time.perf_counter() - start
    total_bytes = sum((out / s["file"]).stat().st_size for s in index["shards"])
    print(
        f"cache: {len(index['shards'])} shards, {args.samples} samples of {args.seq_length} tokens, k {args.top_k}, "
        f"vocab {args.vocab} ({layout.bytes_per_token():.1f} B/token): {total_bytes / 1e6:.0f} MB, written in "
        f"{written:.1f} s; datasets {args.domains} x {args.domain_samples} training samples"
    )

    cache, t_open = timed(lambda: tc.TeacherCache(out))
    run = RunDraws(
        train_iters=args.train_iters,
        global_batch_size=args.global_batch_size,
        interval=args.ddk_interval,
        seed=1234,
        mode="ddk",
    )
    (draws, _), t_cover = timed(
        lambda: samples_a_run_can_draw(sizes, [1.0 / args.domains] * args.domains, run)
    )

    def lookups():
        return [
            (cache.missing("train", d, ids).size, cache.shards_holding("train", d, ids))
            for d, ids in enumerate(draws)
        ]

    _, t_lookup = timed(lookups)
    _, t_verify = timed(lambda: cache.verify(range(len(cache.shards))))
    rate = total_bytes / t_verify  # bytes per CPU second
    print(f"  open the cache (index, plan sha256, sizes, maps): {t_open * 1000:8.1f} ms")
    print(
        f"  coverage of a {args.train_iters} x {args.global_batch_size} DDK run "
        f"({sum(len(d) for d in draws)} draws): {t_cover * 1000:8.1f} ms; its lookups {t_lookup * 1000:.1f} ms"
    )
    print(
        f"  sha256 of every shard: {t_verify:.2f} s = {rate / 1e6:.0f} MB/s on one core "
        "(page cache; split over the ranks in a run)"
    )
    target = args.target_tb * 1e12
    per_rank = target / args.ranks
    idx = args.idx_gb * 1e9
    print(
        f"extrapolated: a {args.target_tb:g} TB cache over {args.ranks} ranks: {per_rank / 1e9:.1f} GB per rank, "
        f"{per_rank / rate:.0f} s of sha256 per rank at {rate / 1e6:.0f} MB/s "
        f"(if the file system delivers {args.ranks} x {rate / 1e6:.0f} MB/s = {args.ranks * rate / 1e9:.0f} GB/s; "
        f"at 20 GB/s aggregate: {target / 20e9:.0f} s); plus {idx / rate:.1f} s per rank for "
        f"{args.idx_gb:g} GB of .idx files"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
