"""Cost of the checkpoint manifest (per-file XXH3-128, checkpoint_manifest.py) on the quickstart teacher's saves.

    python benchmarks/checkpoint_manifest.py                 # 8 saves of the quickstart teacher (CPU)
    python benchmarks/checkpoint_manifest.py --saves 20 --work /tmp/bench

Trains the quickstart teacher (examples/quickstart/run_cpu.sh: 4 layers, hidden 256, vocabulary 4096,
seq 128, with its Adam state) with a save after every iteration, and reads each save's log line
``[ total s, manifest s ]``: the manifest's time is measured inside the very save it is part of, so
the ratio manifest / (total - manifest) is the time it adds to a save without it, side by side.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddk_overhead import ROOT, sh  # noqa: E402
from ddk_overhead import prepare as prepare_demo_data  # noqa: E402

SAVE = re.compile(
    r"successfully saved checkpoint at iteration\s+(\d+) .*\[ ([0-9.]+)s, manifest ([0-9.]+)s \]"
)
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
    "--swiglu",
    "--disable-bias-linear",
    "--untie-embeddings-and-output-weights",
    "--seq-length",
    "128",
    "--micro-batch-size",
    "8",
    "--global-batch-size",
    "16",
    "--lr",
    "3e-3",
    "--ddk-mode",
    "cpt",
    "--ddk-val-samples",
    "8",
    "--log-interval",
    "1",
]


def prepare(work: Path) -> list[str]:
    """The data flags of a run on the demo corpus (built in ``work`` on first use)."""
    registry, tok = prepare_demo_data(work, size_mb=1, vocab_size=4096, model_type="bpe")
    return [
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        str(tok),
        "--domains",
        str(registry),
        "--data-cache-path",
        str(work / "cache"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--saves", type=int, default=8)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_manifest_"))
    data = prepare(work)
    out = sh(
        "pretrain_ddk.py",
        *TEACHER,
        *data,
        "--train-iters",
        str(args.saves),
        "--save",
        str(work / "ckpt"),
        "--save-interval",
        "1",
        cwd=ROOT,
    )
    saves = [(int(i), float(total), float(manifest)) for i, total, manifest in SAVE.findall(out)]
    size = sum(p.stat().st_size for p in (work / "ckpt" / f"iter_{args.saves:07d}").iterdir())
    print(
        f"quickstart teacher checkpoint: {size / 1e6:.1f} MB in "
        f"{len(list((work / 'ckpt' / f'iter_{args.saves:07d}').iterdir()))} files"
    )
    print(f"{'save':>5} {'total s':>8} {'manifest s':>11} {'manifest / rest':>16}")
    ratios = []
    for iteration, total, manifest in saves:
        ratios.append(manifest / (total - manifest))
        print(f"{iteration:5d} {total:8.3f} {manifest:11.4f} {ratios[-1]:15.1%}")
    print(
        f"median added save time: {statistics.median(ratios):.1%} (first save included: it also creates the "
        f"directory tree)"
    )


if __name__ == "__main__":
    main()
