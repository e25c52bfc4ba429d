"""Build speed of the teacher cache: the tool's per-batch work vs the teacher's forward-only pass, side by side.

    python benchmarks/cache_build_speed.py                   # CPU defaults (distill_overhead.py's teacher)
    python benchmarks/cache_build_speed.py --rounds 10 --top-k 64

Both go through the cache tool's own code (``tools/cache_teacher_logits.py``) on the same micro-batches,
alternating, in one process:

- forward: ``teacher_forward`` (megatron-core's ``forward_backward_func``, ``forward_only``, as the tool
  runs it) with nothing done to the logits: the teacher's forward-only cost in a training run;
- tool: ``teacher_rows`` (forward + top-k + log-softmax + tail + CE + fingerprint + copy to numpy) and
  ``write_shard`` (bytes, sha256, atomic write into a temporary directory): everything the tool does
  per shard.

Target: tool tokens/s within 10% of the forward's (tool / forward time <= 1.10). The components of the
extraction are then timed on one micro-batch of logits to show where the rest goes (with megatron-core's
``vocab_parallel_cross_entropy``, which the tool used before, for comparison).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from distill_overhead import (
    Clock,
    add_model_args,
    build_model,
    medians,
    random_samples,
    setup_process,
    tool_args,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def median_cpu_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        with Clock() as clock:
            fn()
        times.append(clock.cpu)
    return 1000 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--warmup", type=int, default=1, help="rounds not timed")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds (forward, tool)")
    args = parser.parse_args()

    import cache_teacher_logits as tool
    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    from megatron_ddk.distill import teacher_cache as tc
    from megatron_ddk.distill.topk_kd_loss import vocab_parallel_topk_and_ce
    from megatron_ddk.platform.distributed import destroy

    pg = setup_process(args.threads)
    _, teacher = build_model(args.teacher, args, pg)
    from megatron_ddk.distill.model import freeze

    freeze(teacher)
    mbs, seq = args.micro_batch_size, args.seq_length
    count = args.num_microbatches * mbs
    samples = random_samples(count, seq, args.vocab)
    ids = np.arange(count)
    layout = tc.CacheLayout.for_vocabulary(
        seq_length=seq, top_k=args.top_k, vocab_size=args.vocab, tail_samples=args.tail_samples
    )
    targs = tool_args(args)
    out = Path(tempfile.mkdtemp(prefix="cache_build_speed_"))

    def forward() -> None:
        tool.teacher_forward(
            teacher,
            tool.micro_batches(samples, mbs),
            seq_length=seq,
            micro_batch_size=mbs,
            pg=pg,
            on_logits=lambda batch, logits: None,
        )

    def build() -> None:
        arrays = tool.teacher_rows(teacher, samples, ids, args=targs, vocab_size=args.vocab, pg=pg)
        tc.write_shard(out / tc.shard_name("train", 0, 0), layout, arrays)

    times = {"forward": [], "tool": []}
    for round_ in range(args.warmup + args.rounds):
        for name, fn in (
            (("forward", forward), ("tool", build)) if round_ % 2 else (("tool", build), ("forward", forward))
        ):
            with Clock() as clock:
                fn()
            if round_ >= args.warmup:
                times[name].append(clock)

    # where the tool's extra time goes, on one micro-batch of logits
    batch = tool.micro_batches(samples[:mbs], mbs)[0]
    with torch.no_grad():
        logits = teacher(batch["tokens"], batch["position_ids"], None)  # [b, s, v]
    flat = logits.reshape(mbs * seq, -1)
    arrays = tool.teacher_rows(teacher, samples, ids, args=targs, vocab_size=args.vocab, pg=pg)
    repeats = 2 * args.rounds + 1
    sampling = {}
    if args.tail_samples:
        draws = torch.rand(flat.shape[0], dtype=torch.float64)
        sampling = {"tail_samples": args.tail_samples, "draws": draws}
    parts = {
        "top-k + tail + CE (the tool's)": lambda: vocab_parallel_topk_and_ce(
            flat, args.top_k, labels=batch["labels"], vocab_size=args.vocab, **sampling
        ),
        "top-k + tail alone": lambda: vocab_parallel_topk_and_ce(flat, args.top_k, vocab_size=args.vocab),
        "megatron-core CE (+ a clone)": lambda: tensor_parallel.vocab_parallel_cross_entropy(
            logits.clone(), batch["labels"]
        ),
        "fingerprints": lambda: [tc.sample_fingerprint(s["tokens"], s["labels"]) for s in samples[:mbs]],
        f"write_shard ({count} rows, per {mbs})": lambda: tc.write_shard(
            out / tc.shard_name("train", 0, 1), layout, arrays
        ),
    }
    part_ms = {name: median_cpu_ms(fn, repeats) for name, fn in parts.items()}
    destroy()

    (fwd_wall, fwd), (full_wall, full) = medians(times["forward"]), medians(times["tool"])
    tokens = count * seq
    print(
        f"teacher {args.teacher}, vocab {args.vocab}, seq {seq}, {args.num_microbatches} x {mbs} sequences, "
        f"k {args.top_k} + {args.tail_samples} tail samples, torch threads {torch.get_num_threads()}, {args.rounds} timed rounds"
    )
    for name, wall, cpu in (
        ("teacher forward only", fwd_wall, fwd),
        ("tool (rows + shard)", full_wall, full),
    ):
        print(
            f"{name:>20}: median wall {wall * 1000:8.1f} ms | CPU {cpu * 1000:8.1f} ms = {tokens / cpu:8.0f} tokens/CPU-s"
        )
    print(
        f"tool / forward: CPU {full / fwd:.3f} (target <= 1.10: tool tokens/s {fwd / full:.1%} of the forward's) | "
        f"wall {full_wall / fwd_wall:.3f}"
    )
    print(
        f"per micro-batch ({mbs} x {seq} tokens), CPU ms, median of {repeats} (forward ~{fwd * 1000 / args.num_microbatches:.1f}):"
    )
    for name, ms in part_ms.items():
        per_mb = ms / args.num_microbatches if name.startswith("write_shard") else ms
        print(f"  {name:>34}: {per_mb:7.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
