"""Benchmark: what the KD term adds to the student's loss computation, cached top-k vs online full vocabulary.

On the same seeded logits (TP=1), the median time of forward + backward of:

- ``ce``: megatron-core's ``vocab_parallel_cross_entropy`` alone (what a CPT step computes on its logits);
- ``ce + sparse kd``: plus ``vocab_parallel_topk_kd_loss`` from a top-k (what a KD step from a cache adds);
- ``ce + full kd``: plus ``vocab_parallel_kd_loss`` on the teacher's full logits (what online KD adds,
  the teacher's forward not included).

Printed as milliseconds and as ratios to ``ce``. The model's own forward and backward come on top of
all three (the same for each), so these ratios bound the whole-iteration ratios from above.

    python benchmarks/topk_kd_loss.py                          # 2048 tokens x 32000 (LLaMA) vocab, k = 32
    python benchmarks/topk_kd_loss.py --vocab 151936 --tokens 1024
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's megatron_ddk

from megatron_ddk.distill.kd_loss import default_chunk_size, vocab_parallel_kd_loss
from megatron_ddk.distill.topk_kd_loss import vocab_parallel_topk, vocab_parallel_topk_kd_loss


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from megatron.core import tensor_parallel

    from megatron_ddk.platform.distributed import ParallelLayout, destroy, initialize
    from megatron_ddk.platform.startup import prepare_process

    prepare_process()
    initialize(ParallelLayout(world_size=1))
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(args.tokens, 1, args.vocab, generator=g) * 3).to(dtype)  # [s, b, v]
    teacher = (torch.randn(args.tokens, 1, args.vocab, generator=g) * 3).to(dtype)
    labels = torch.randint(0, args.vocab, (args.tokens, 1), generator=g)
    ids, logp, tail = vocab_parallel_topk(teacher.reshape(args.tokens, -1).float(), args.top_k)
    ids, logp, tail = (
        ids.int().reshape(args.tokens, 1, -1),
        logp.half().reshape(args.tokens, 1, -1),
        tail.half().reshape(args.tokens, 1),
    )
    chunk = default_chunk_size(args.vocab)

    def step(kind: str) -> float:
        logits = student.clone().requires_grad_()
        start = time.perf_counter()
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels).sum()
        if kind == "sparse":
            loss = loss + vocab_parallel_topk_kd_loss(logits, ids, logp, tail, chunk_size=chunk).sum()
        elif kind == "full":
            loss = loss + vocab_parallel_kd_loss(logits, teacher, chunk_size=chunk).sum()
        loss.backward()
        return time.perf_counter() - start

    names = {"ce": "ce", "sparse": "ce + sparse kd", "full": "ce + full kd"}
    times = {kind: [] for kind in names}
    for kind in names:
        step(kind)  # warm-up
    for _ in range(args.repeats):  # interleaved, so a change of machine load hits all three alike
        for kind in names:
            times[kind].append(step(kind))
    median = {kind: statistics.median(t) * 1000 for kind, t in times.items()}
    print(
        f"KD loss cost: {args.tokens} tokens x {args.vocab} vocab, {args.dtype}, k {args.top_k}, chunk {chunk}, "
        f"median of {args.repeats}"
    )
    for kind, name in names.items():
        print(f"  {name:>15}: {median[kind]:8.1f} ms | x{median[kind] / median['ce']:.2f} of ce")
    print(f"  sparse / full KD loss step: {median['sparse'] / median['full']:.2f}")
    destroy()


if __name__ == "__main__":
    main()
