"""Peak memory and time of the chunked vocab-parallel KD loss against a naive full-vocabulary version.

    python benchmarks/kd_loss.py                      # V=151936 (Qwen), 1024 tokens, bf16 logits, CPU
    python benchmarks/kd_loss.py --tokens 4096 --dtype fp32 --chunk-size 512

Each implementation runs forward + backward in its own fresh process (CPU: peak RSS growth from
``ru_maxrss`` after the inputs exist; CUDA: ``max_memory_allocated`` above the inputs), so the two
never share an allocator. Both run in the same invocation and the ratios are printed side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(impl: str, tokens: int, vocab: int, dtype: str, chunk: int, kind: str, repeats: int, device: str) -> dict:
    import torch

    from megatron_ddk.distill.kd_loss import reference_kd_loss, vocab_parallel_kd_loss

    torch.manual_seed(0)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    student = (torch.randn(tokens, 1, vocab, device=device) * 2).to(torch_dtype).requires_grad_()
    teacher = (torch.randn(tokens, 1, vocab, device=device) * 2).to(torch_dtype)

    def step():
        if impl == "naive":
            loss = reference_kd_loss(student, teacher, kind=kind)
        else:
            loss = vocab_parallel_kd_loss(student, teacher, kind=kind, chunk_size=chunk)
        loss.sum().backward()
        student.grad = None

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    input_bytes = 2 * student.numel() * student.element_size()
    return {"impl": impl, "peak_bytes": peak, "seconds": statistics.median(times), "input_bytes": input_bytes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--kind", default="forward_kl")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.child:
        result = measure(args.child, args.tokens, args.vocab, args.dtype, args.chunk_size, args.kind, args.repeats,
                         device)
        print(json.dumps(result))
        return 0
    results = {}
    for impl in ("naive", "chunked"):
        cmd = [sys.executable, __file__, "--child", impl, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
               "--dtype", args.dtype, "--chunk-size", str(args.chunk_size), "--kind", args.kind,
               "--repeats", str(args.repeats), "--device", device]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    naive, chunked = results["naive"], results["chunked"]
    gib = 1024 ** 3
    print(f"KD loss ({args.kind}) forward+backward, {args.tokens} tokens x V={args.vocab}, {args.dtype} logits, "
          f"{device}, chunk {args.chunk_size} tokens; inputs {naive['input_bytes'] / gib:.2f} GiB")
    print(f"{'':>10s} | {'peak extra memory':>18s} | {'time (median)':>13s}")
    for name, r in (("naive", naive), ("chunked", chunked)):
        print(f"{name:>10s} | {r['peak_bytes'] / gib:15.2f} GiB | {r['seconds']:11.3f} s")
    print(f"{'ratio':>10s} | {chunked['peak_bytes'] / naive['peak_bytes']:17.1%} | "
          f"{chunked['seconds'] / naive['seconds']:12.2f}x   (chunked / naive)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
