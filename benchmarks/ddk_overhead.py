"""Cost of DDK over static-mixture KD: wall time per iteration, measured side by side in one run.

    python benchmarks/ddk_overhead.py                       # CPU: tiny models on the demo corpus
    python benchmarks/ddk_overhead.py --interval 50 --val-samples 64 --iters 200 --repeats 2

Runs ``pretrain_ddk.py --ddk-mode kd`` (static mixture) and ``--ddk-mode ddk`` (per-domain student
validation every ``--interval`` iterations + the mixing sampler) alternately with identical models,
data and batch, and compares the training time per iteration read from their Megatron log lines
(the DDK evaluations happen inside the loop, so they are in it; process start-up, the one-off
teacher evaluation at iteration 0 and the final evaluation are not, for either mode).

The extra work DDK does per K iterations is one forward pass of the student over N x V validation
samples (N domains, V = --ddk-val-samples); relative to K iterations of distillation (student
forward+backward and teacher forward on K x global batch) that is roughly
N*V / (K * GBS * (3 + 3 * teacher_cost/student_cost)); the paper's setting (K=1000, V=500) makes it
well under 1%.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"iteration\s+\d+/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+)")


def sh(*cmd: str, cwd: Path = ROOT) -> str:
    proc = subprocess.run(
        [sys.executable, *cmd],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"},
    )
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:2])} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def prepare(
    work: Path, *, size_mb: float = 2, vocab_size: int = 2048, model_type: str | None = None
) -> tuple[Path, Path]:
    """The demo corpus, a SentencePiece tokenizer and one indexed dataset per domain in ``work`` (kept
    between calls: each step runs only if its output is missing); returns (registry, tokenizer model)."""
    corpus = work / "corpus"
    if not (corpus / "domains.yaml").exists():
        sh("tools/make_demo_corpus.py", "--output-dir", str(corpus), "--size-mb", str(size_mb))
    names = [
        line.split(":")[1].strip()
        for line in (corpus / "domains.yaml").read_text().splitlines()
        if line.strip().startswith("- name:")
    ]
    tok = work / "tok.model"
    if not tok.exists():
        sh(
            "tools/train_tokenizer.py",
            "--input",
            *[str(corpus / f"{n}.jsonl") for n in names],
            "--output-prefix",
            str(work / "tok"),
            "--vocab-size",
            str(vocab_size),
            *(["--model-type", model_type] if model_type else []),
        )
    for n in names:
        if not (corpus / f"{n}_text_document.idx").exists():
            sh(
                "tools/preprocess_data.py",
                "--input",
                str(corpus / f"{n}.jsonl"),
                "--output-prefix",
                str(corpus / n),
                "--tokenizer-type",
                "SentencePieceTokenizer",
                "--tokenizer-model",
                str(tok),
                "--append-eod",
                "--no-progress",
            )
    return corpus / "domains.yaml", tok


def per_iteration_ms(stdout: str, log_interval: int) -> float:
    values = [float(v) for v in LINE.findall(stdout)]
    return statistics.fmean(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work-dir", default=None, help="reused between runs (default: a temp dir)")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--interval", type=int, default=50)
    parser.add_argument("--val-samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ddk_overhead_"))
    work.mkdir(parents=True, exist_ok=True)
    registry, tok = prepare(work)
    data = [
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        str(tok),
        "--domains",
        str(registry),
        "--data-cache-path",
        str(work / "cache"),
        "--seq-length",
        "128",
    ]
    common = [
        "--swiglu",
        "--disable-bias-linear",
        "--untie-embeddings-and-output-weights",
        "--micro-batch-size",
        "8",
        "--global-batch-size",
        "16",
        "--seed",
        "1234",
        "--lr",
        "1e-3",
        "--ddk-val-samples",
        str(args.val_samples),
    ]
    teacher = work / "teacher"
    if not (teacher / "latest_checkpointed_iteration.txt").exists():
        sh(
            "pretrain_ddk.py",
            "--ddk-mode",
            "cpt",
            *data,
            *common,
            "--num-layers",
            "4",
            "--hidden-size",
            "256",
            "--num-attention-heads",
            "8",
            "--ffn-hidden-size",
            "704",
            "--train-iters",
            "20",
            "--save",
            str(teacher),
        )
    student = [
        "--num-layers",
        "2",
        "--hidden-size",
        "128",
        "--num-attention-heads",
        "4",
        "--ffn-hidden-size",
        "352",
        "--teacher-load",
        str(teacher),
        "--train-iters",
        str(args.iters),
        "--log-interval",
        str(args.interval),
        "--ddk-interval",
        str(args.interval),
    ]
    times = {"kd": [], "ddk": []}
    for _ in range(args.repeats):
        for mode in ("kd", "ddk"):  # alternate, so drifting machine load hits both alike
            out = sh("pretrain_ddk.py", "--ddk-mode", mode, *data, *common, *student)
            times[mode].append(per_iteration_ms(out, args.interval))
    kd, ddk = statistics.median(times["kd"]), statistics.median(times["ddk"])
    print(
        f"{args.iters} iterations, K={args.interval}, {args.val_samples} validation samples/domain, "
        f"GBS 16 x seq 128; runs per mode: {args.repeats} (alternating)"
    )
    print(f"{'mode':>5s} | {'ms / iteration (median)':>24s} | runs")
    print(f"{'kd':>5s} | {kd:24.1f} | {', '.join(f'{t:.1f}' for t in times['kd'])}")
    print(f"{'ddk':>5s} | {ddk:24.1f} | {', '.join(f'{t:.1f}' for t in times['ddk'])}")
    print(f"DDK / KD wall time per iteration: {ddk / kd:.3f}x ({100 * (ddk / kd - 1):+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
