"""Benchmark: a teacher cache against the online teacher, side by side in one run on the demo corpus.

Builds the demo corpus, a teacher (--ddk-mode cpt) and, for each ``--top-k`` (``K``, or ``K+S``: the
top-K and S tokens sampled from the tail, ``--tail-samples S``), a cache of exactly what the KD runs
draw (tools/cache_teacher_logits.py), then runs, with the same seed and flags, CPT and KD with the
online teacher once, and KD from each cache:

- quality at each k: each KD run's final per-domain validation CE (the "student ppl after" column),
  cache vs online (target at k = 32: within 0.5%), and CPT's for scale;
- DDK from the (first) cache vs online DDK: the first window's weights (Eq. 1 from the teacher's
  validation CE);
- storage: bytes per cached token (files on disk / tokens) at each k;
- the tool's end-to-end tokens/s from its last line (context only: the build-speed target is measured
  side by side by benchmarks/cache_build_speed.py, iteration times by benchmarks/distill_overhead.py).

    python benchmarks/teacher_cache.py --work-dir /tmp/bench_tc
    python benchmarks/teacher_cache.py --work-dir /tmp/bench_tc --top-k 8 16 32 64 --student-iters 200
    python benchmarks/teacher_cache.py --work-dir /tmp/bench_tc --top-k 32 24+8 16+16 --student-iters 200

Each run's output is kept in WORK/runs/ and reused by a later call with the same work directory (so
more caches can be compared against the same online run); delete it to measure again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's megatron_ddk
TEACHER = [
    "--num-layers",
    "4",
    "--hidden-size",
    "256",
    "--num-attention-heads",
    "8",
    "--num-query-groups",
    "4",
    "--ffn-hidden-size",
    "704",
]
STUDENT = [
    "--num-layers",
    "2",
    "--hidden-size",
    "128",
    "--num-attention-heads",
    "4",
    "--num-query-groups",
    "2",
    "--ffn-hidden-size",
    "352",
]
COMMON = ["--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--seed", "1234"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", type=Path, required=True)
    p.add_argument("--size-mb", type=float, default=1.0, help="demo corpus size")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--teacher-iters", type=int, default=100)
    p.add_argument("--student-iters", type=int, default=60)
    p.add_argument(
        "--top-k", nargs="+", default=["32"], help="one cache (and KD run) per K or K+S (S tail samples)"
    )
    p.add_argument("--val-samples", type=int, default=32)
    p.add_argument("--nproc", type=int, default=1)
    return p.parse_args(argv)


def run(*cmd, torchrun_nproc: int | None = None) -> str:
    full = [
        sys.executable,
        *(
            ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun_nproc}"]
            if torchrun_nproc
            else []
        ),
        *map(str, cmd),
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(full, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(full)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def final_ce(stdout: str) -> dict[str, float]:
    """Per-domain final student CE from the result table (``student ppl after``)."""
    rows = {}
    table = stdout[stdout.rindex("student ppl after") :]
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 6:
            rows[cells[0]] = math.log(float(cells[3]))
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    work = args.work_dir.resolve()
    corpus = work / "corpus"
    if not (work / "tokenizer.model").exists():
        run("tools/make_demo_corpus.py", "--output-dir", corpus, "--size-mb", args.size_mb, "--seed", "1234")
        names = [
            line.split(":", 1)[1].strip()
            for line in (corpus / "domains.yaml").read_text().splitlines()
            if line.strip().startswith("- name:")
        ]
        run(
            "tools/train_tokenizer.py",
            "--input",
            *[corpus / f"{n}.jsonl" for n in names],
            "--output-prefix",
            work / "tokenizer",
            "--vocab-size",
            args.vocab_size,
            "--model-type",
            "bpe",
            "--num-threads",
            "2",
        )
        for n in names:
            run(
                "tools/preprocess_data.py",
                "--input",
                corpus / f"{n}.jsonl",
                "--output-prefix",
                corpus / n,
                "--tokenizer-type",
                "SentencePieceTokenizer",
                "--tokenizer-model",
                work / "tokenizer.model",
                "--append-eod",
                "--workers",
                "1",
            )
    data = [
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        work / "tokenizer.model",
        "--domains",
        corpus / "domains.yaml",
        "--data-cache-path",
        work / "data_cache",
        "--seq-length",
        args.seq_length,
    ]
    batch = ["--micro-batch-size", args.micro_batch_size, "--global-batch-size", args.global_batch_size]
    if not (work / "teacher" / "latest_checkpointed_iteration.txt").exists():
        run(
            "pretrain_ddk.py",
            "--ddk-mode",
            "cpt",
            *data,
            *COMMON,
            *TEACHER,
            *batch,
            "--train-iters",
            args.teacher_iters,
            "--lr",
            "3e-3",
            "--min-lr",
            "3e-4",
            "--lr-warmup-iters",
            "10",
            "--log-interval",
            "50",
            "--ddk-val-samples",
            args.val_samples,
            "--save",
            work / "teacher",
            torchrun_nproc=args.nproc,
        )
    caches, tool_rates = {}, {}
    for k in args.top_k:
        top, _, samples = k.partition("+")
        caches[k] = work / (f"cache_k{top}" + (f"_s{samples}" if samples else ""))
        tool_out = run(
            "tools/cache_teacher_logits.py",
            "--output",
            caches[k],
            "--teacher-load",
            work / "teacher",
            *data,
            "--top-k",
            top,
            "--tail-samples",
            samples or "0",
            "--micro-batch-size",
            args.micro_batch_size,
            "--val-samples",
            args.val_samples,
            "--train-iters",
            args.student_iters,
            "--global-batch-size",
            args.global_batch_size,
            "--ddk-mode",
            "kd",
            "--no-progress",
            torchrun_nproc=args.nproc,
        )
        tool_rates[k] = float(re.findall(r"\(([0-9.]+) tokens/s over all ranks\)", tool_out)[-1])

    student = [
        *data,
        *COMMON,
        *STUDENT,
        *batch,
        "--train-iters",
        args.student_iters,
        "--lr",
        "1e-3",
        "--min-lr",
        "1e-4",
        "--lr-warmup-iters",
        "5",
        "--log-interval",
        args.student_iters // 2,
        "--kd-weight",
        "0.5",
        "--ddk-val-samples",
        args.val_samples,
    ]
    results = {}
    (work / "runs").mkdir(exist_ok=True)
    for name, extra in [
        ("cpt", ["--ddk-mode", "cpt"]),
        ("kd online", ["--ddk-mode", "kd", "--teacher-load", work / "teacher"]),
        *[(f"kd cache k={k}", ["--ddk-mode", "kd", "--teacher-cache", caches[k]]) for k in args.top_k],
    ]:
        kept = work / "runs" / (re.sub(r"[^A-Za-z0-9+]+", "_", name) + f"_{args.student_iters}it.txt")
        if not kept.exists():
            kept.write_text(run("pretrain_ddk.py", *student, *extra, torchrun_nproc=args.nproc))
        results[name] = kept.read_text()
    ddk_logs = {}
    for name, extra in [
        ("online", ["--teacher-load", work / "teacher"]),
        ("cache", ["--teacher-cache", caches[args.top_k[0]]]),
    ]:
        log = work / f"ddk_{name}.jsonl"
        log.unlink(missing_ok=True)
        run(
            "pretrain_ddk.py",
            *student,
            "--ddk-mode",
            "ddk",  # the later flags win: 2 iterations
            "--train-iters",
            "2",
            "--log-interval",
            "1",
            "--lr-warmup-iters",
            "1",
            "--ddk-log-file",
            log,
            *extra,
            torchrun_nproc=args.nproc,
        )
        ddk_logs[name] = json.loads(log.read_text().splitlines()[0])

    ce = {name: final_ce(out) for name, out in results.items()}
    from megatron_ddk.distill.teacher_cache import read_index

    print(
        f"teacher cache benchmark: {args.nproc} process(es), seq {args.seq_length}, global batch "
        f"{args.global_batch_size}, {args.student_iters} iterations, vocab {args.vocab_size}, k {args.top_k}"
    )
    for k in args.top_k:
        index = read_index(caches[k])
        shard_bytes = sum((caches[k] / s["file"]).stat().st_size for s in index["shards"])
        cached_tokens = sum(s["stop"] - s["start"] for s in index["shards"]) * args.seq_length
        print(
            f"  k={k}: storage {shard_bytes / cached_tokens:.1f} B/token on disk ({cached_tokens} tokens); "
            + (
                f"tool {tool_rates[k]:.0f} tokens/s end to end (its last line)"
                if tool_rates[k]
                else "built by an earlier call"
            )
        )
    domains = list(ce["kd online"])
    print("  final validation CE per domain, and KD from the cache vs online KD:")
    print("  " + " | ".join([f"{'run':>16}", *[f"{d:>18}" for d in domains]]))
    for name in results:
        cells = []
        for d in domains:
            rel = 100 * (ce[name][d] - ce["kd online"][d]) / ce["kd online"][d]
            cells.append(f"{ce[name][d]:.4f} ({rel:+.2f}%)" if name != "kd online" else f"{ce[name][d]:.4f}")
        print("  " + " | ".join([f"{name:>16}", *[f"{c:>18}" for c in cells]]))
    w_online, w_cache = ddk_logs["online"]["weights"], ddk_logs["cache"]["weights"]
    print(
        f"  DDK first-window weights (cache k={args.top_k[0]}): online {[round(w, 6) for w in w_online]} | cache "
        f"{[round(w, 6) for w in w_cache]} | max abs diff {max(abs(a - b) for a, b in zip(w_online, w_cache)):.2e}"
    )


if __name__ == "__main__":
    main()
