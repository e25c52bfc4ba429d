"""Activation memory of the student with and without recomputation (``--recompute-*``), side by side.

    python benchmarks/activation_memory.py                   # CPU defaults below
    python benchmarks/activation_memory.py --seq-length 2048 --micro-batch-size 2

Each variant runs in its own fresh process (no allocator state shared): the student model built the
way ``pretrain_ddk.py`` builds it (``build_gpt_model`` with the run's ``RecomputeConfig``), one
warm-up forward + backward, then one measured forward + backward on the same batch. Reported:

- saved activations: bytes of the distinct tensors autograd keeps for the backward pass at the end of
  the forward (``torch.autograd.graph.saved_tensors_hooks``; parameters excluded). This is exactly the
  memory recomputation trades for time, on any device.
- peak RSS growth: the process's peak resident memory during the measured forward + backward minus its
  resident memory just before it (``/proc/self/statm``, ``getrusage``), i.e. what the OS saw;
- time of the forward + backward (recomputation runs each recomputed forward twice).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "none": None,
    "selective": ("selective", None, None),
    "full-uniform-1": ("full", "uniform", 1),
    "full-block-half": ("full", "block", "half"),
}


def current_rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(variant: str, args) -> dict:
    import torch

    from benchmarks.distill_overhead import build_model
    from megatron_ddk.config import RecomputeConfig
    from megatron_ddk.platform.distributed import ParallelLayout, destroy, initialize, set_seed
    from megatron_ddk.platform.startup import prepare_process

    prepare_process()
    pg = initialize(ParallelLayout(world_size=1))
    set_seed(1234, pg)
    layers = int(args.student.split(",")[0])
    spec = VARIANTS[variant]
    recompute = None
    if spec is not None:
        granularity, method, num = spec
        recompute = RecomputeConfig(
            granularity=granularity, method=method, num_layers=layers // 2 if num == "half" else num
        )
    _, model = build_model(args.student, args, pg, recompute=recompute)
    model.train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.micro_batch_size, args.seq_length), generator=g)
    positions = torch.arange(args.seq_length).expand(args.micro_batch_size, -1)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def step(saved: dict | None = None):
        def pack(tensor):
            ptr = tensor.untyped_storage().data_ptr()
            if saved is not None and ptr not in params:
                saved[ptr] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            logits = model(tokens, positions, None)
        loss = logits.float().logsumexp(-1).mean()  # a loss over every logit, like the LM loss
        loss.backward()
        model.zero_grad(set_to_none=False)
        return float(loss)

    step()  # warm-up: gradients allocated, lazy initialisations done
    saved: dict[int, int] = {}
    before = current_rss()
    start = time.perf_counter()
    loss = step(saved)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    destroy()
    return {
        "variant": variant,
        "saved_bytes": sum(saved.values()),
        "rss_growth": max(peak - before, 0),
        "seconds": elapsed,
        "loss": loss,
        "recompute": str(recompute),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--student", default="8,512,8,1408", help="layers,hidden,heads,ffn")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, args)), flush=True)
        return 0
    results = []
    passthrough = [a for a in sys.argv[1:] if a not in args.variants and a != "--variants"]
    for variant in args.variants:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", variant, *passthrough],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[-1][7:]))
    base = results[0]
    print(
        f"student {args.student} (layers,hidden,heads,ffn), vocab {args.vocab}, seq {args.seq_length}, "
        f"micro-batch {args.micro_batch_size}, fp32, one forward + backward"
    )
    print(
        f"{'variant':>16} | {'saved activations':>17} | {'vs ' + base['variant']:>9} | {'peak RSS growth':>15} | "
        f"{'vs ' + base['variant']:>9} | {'fwd+bwd s':>9} | {'loss':>8}"
    )
    for r in results:
        print(
            f"{r['variant']:>16} | {r['saved_bytes'] / 2**20:13.1f} MiB | {r['saved_bytes'] / base['saved_bytes']:9.2f} | "
            f"{r['rss_growth'] / 2**20:11.1f} MiB | {r['rss_growth'] / max(base['rss_growth'], 1):9.2f} | "
            f"{r['seconds']:9.2f} | {r['loss']:8.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
