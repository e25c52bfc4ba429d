"""Benchmark: chunked vocab-parallel KD loss vs the naive full-vocabulary autograd loss (TP=1).

Each implementation runs forward + backward in its own fresh process (so one cannot inherit the
other's allocator state) on the same seeded logits. Reported per implementation: the peak memory
ABOVE the inputs (CPU: the process's peak RSS, ``ru_maxrss``, minus its RSS once the inputs exist
and the kernels' code is paged in; CUDA: ``max_memory_allocated`` minus the bytes allocated once
the inputs exist), the median time of ``--repeats`` forward + backward passes, and the relative
difference of the two loss sums (a check that both computed the same thing). The student's
gradient counts towards the peak of both.

    python benchmarks/kd_loss.py                      # 2048 tokens x 151936 (Qwen) vocab, fp32, chunk 128
    python benchmarks/kd_loss.py --dtype bf16 --kind jsd --chunk-size 64
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("naive", "chunked")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens (s*b) in the micro-batch")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size (default: Qwen's 151936)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of both logits")
    p.add_argument("--kind", choices=("forward_kl", "reverse_kl", "jsd"), default="forward_kl")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--chunk-size", type=int, default=128, help="tokens per chunk of the chunked loss")
    p.add_argument("--repeats", type=int, default=3, help="timed forward+backward passes (median reported)")
    p.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="untimed full-size passes first (their memory still counts); the kernels are always "
        "warmed on 4 tokens before the baseline",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: the CPU, then CUDA too when available",
    )
    p.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--child-device", default="cpu", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    problems = [
        f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
        for name in ("tokens", "vocab", "repeats")
        if getattr(args, name) < 1
    ]
    if args.warmup < 0:
        problems.append(f"--warmup must be >= 0, got {args.warmup}")
    if not args.temperature > 0:
        problems.append(f"--temperature must be > 0, got {args.temperature}")
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda: no CUDA device is available; use --device cpu")
    if problems:
        p.error("; ".join(problems))
    return args


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _load_kd_loss():
    """The module from its file: it needs only torch, so the benchmark also runs where megatron-core
    (which the package's __init__ requires) is not installed, e.g. a bare GPU box."""
    path = REPO / "megatron_ddk" / "distill" / "kd_loss.py"
    spec = importlib.util.spec_from_file_location("kd_loss_under_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_child(args: argparse.Namespace) -> dict:
    """One implementation, measured in this (fresh) process."""
    kd_loss = _load_kd_loss()
    reference_kd_loss, vocab_parallel_kd_loss = kd_loss.reference_kd_loss, kd_loss.vocab_parallel_kd_loss

    device = torch.device(args.child_device)
    cuda = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(1234)
    shape = (args.tokens, 1, args.vocab)  # [s, b, v]
    # filled in place: no input-sized temporary raises the peak before the baseline is taken
    student = torch.empty(shape, dtype=DTYPES[args.dtype], device=device).normal_(0.0, 3.0, generator=gen)
    teacher = torch.empty(shape, dtype=DTYPES[args.dtype], device=device).normal_(0.0, 3.0, generator=gen)
    student.requires_grad_()

    def loss_fn(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if args.child == "naive":
            return reference_kd_loss(s, t, kind=args.kind, temperature=args.temperature)
        return vocab_parallel_kd_loss(
            s, t, kind=args.kind, temperature=args.temperature, chunk_size=args.chunk_size
        )

    # page in the kernels' code (it counts in RSS) on a few tokens before taking the baseline
    tiny = student[:4].detach().clone().requires_grad_()
    loss_fn(tiny, teacher[:4]).sum().backward()
    del tiny
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base, base_peak = _current_rss_bytes(), _peak_rss_bytes()
    times, loss_sum = [], 0.0
    for i in range(args.warmup + args.repeats):
        student.grad = None
        start = time.perf_counter()
        loss = loss_fn(student, teacher).sum()
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        loss_sum = loss.item()
        del loss
    peak = torch.cuda.max_memory_allocated() - base if cuda else _peak_rss_bytes() - base
    return {
        "peak_bytes": peak,
        "time_s": statistics.median(times),
        "loss_sum": loss_sum,
        "baseline_ok": cuda or base_peak <= base + 64 * 2**20,
        "grad_bytes": student.grad.numel() * student.grad.element_size(),
        "threads": torch.get_num_threads(),
    }


def measure(args: argparse.Namespace, impl: str, device: str) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        impl,
        "--child-device",
        device,
        "--tokens",
        str(args.tokens),
        "--vocab",
        str(args.vocab),
        "--dtype",
        args.dtype,
        "--kind",
        args.kind,
        "--temperature",
        str(args.temperature),
        "--chunk-size",
        str(args.chunk_size),
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
    ]
    # a fixed glibc mmap threshold: every buffer >= 64 KiB goes back to the OS when freed, so the peak
    # RSS follows live tensors, not what glibc's adaptive threshold would keep in its heap
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(
            f"{impl} on {device} failed (exit {proc.returncode}); out of memory? try fewer --tokens\n"
            f"{proc.stderr[-3000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    devices = (
        [args.device] if args.device != "auto" else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    input_mib = 2 * args.tokens * args.vocab * DTYPES[args.dtype].itemsize / 2**20
    print(
        f"KD loss {args.kind}, T={args.temperature}: {args.tokens} tokens x {args.vocab} vocab, {args.dtype} "
        f"logits ({input_mib:.0f} MiB of inputs), chunk {args.chunk_size} tokens, TP=1, forward+backward, "
        f"median of {args.repeats} after {args.warmup} warm-up"
    )
    header = (
        f"{'device':<7}{'naive MiB':>11}{'chunked MiB':>13}{'mem ratio':>11}"
        f"{'naive s':>10}{'chunked s':>11}{'time ratio':>12}{'|dloss|/loss':>14}"
    )
    print(header)
    print("-" * len(header))
    for device in devices:
        naive, chunked = (measure(args, impl, device) for impl in IMPLS)
        rel = abs(naive["loss_sum"] - chunked["loss_sum"]) / max(abs(naive["loss_sum"]), 1e-30)
        print(
            f"{device:<7}{naive['peak_bytes'] / 2**20:>11.0f}{chunked['peak_bytes'] / 2**20:>13.0f}"
            f"{chunked['peak_bytes'] / naive['peak_bytes']:>11.3f}{naive['time_s']:>10.3f}"
            f"{chunked['time_s']:>11.3f}{chunked['time_s'] / naive['time_s']:>12.3f}{rel:>14.1e}"
        )
        if not (naive["baseline_ok"] and chunked["baseline_ok"]):
            print(f"  warning ({device}): the peak before the run exceeded the inputs; memory is understated")
    print(
        f"(peak memory above the inputs; the student gradient is {chunked['grad_bytes'] / 2**20:.0f} MiB of "
        f"it in both; torch threads: {chunked['threads']})"
    )


if __name__ == "__main__":
    main()
