"""tools/preprocess_data.py against Megatron-LM's tools/preprocess_data.py, alternately on the same input.

    git clone --depth 1 --branch core_v0.16.1 https://github.com/NVIDIA/Megatron-LM /tmp/Megatron-LM
    pip install --target /tmp/mlm-deps six pydantic triton      # what its imports need beyond megatron-core
    python benchmarks/preprocess.py --megatron-lm /tmp/Megatron-LM --megatron-lm-pythonpath /tmp/mlm-deps \\
        --input real.jsonl --tokenizer-model tok.model --workers 2 --rounds 3

Megatron-LM stays outside this repository (``--megatron-lm`` points at a checkout anywhere). Each round
runs both tools as fresh processes on the same JSONL, tokenizer and ``--workers``, the order swapped
every round so that neither always runs on a warmer page cache; the time is the whole command, start-up
included (what a user waits for). Prints tokens/s of each per round, the ratio ours / Megatron-LM's per
round and its median, the CPU seconds each used (the process and its workers: a measure that hardly
depends on the machine's load, unlike the wall time), and whether the ``.bin``/``.idx`` outputs are
byte-identical in every round.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of the process and the workers it reaped) of ``cmd``; stops the
    benchmark with its stderr if it fails. CPU time hardly depends on what else the machine runs."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def tokens_in(prefix: Path) -> int:
    """Tokens in ``<prefix>.bin`` (the index header's dtype code: 8 = uint16, 4 = int32)."""
    code = (prefix.with_suffix(".idx")).read_bytes()[17]
    return prefix.with_suffix(".bin").stat().st_size // (2 if code == 8 else 4)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--megatron-lm", required=True, type=Path, help="a Megatron-LM checkout (core_v0.16.1)"
    )
    parser.add_argument(
        "--megatron-lm-pythonpath",
        default="",
        help="extra PYTHONPATH for Megatron-LM's tool (six, pydantic, triton it imports)",
    )
    parser.add_argument("--input", required=True, type=Path, help="a JSONL file with a 'text' key")
    parser.add_argument("--tokenizer-type", default="SentencePieceTokenizer")
    parser.add_argument("--tokenizer-model", required=True, type=Path)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-dir", type=Path, default=None, help="default: a temporary directory")
    args = parser.parse_args()
    theirs_tool = args.megatron_lm / "tools" / "preprocess_data.py"
    if not theirs_tool.is_file():
        raise SystemExit(f"--megatron-lm {args.megatron_lm}: no tools/preprocess_data.py there")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["PYTHONWARNINGS"] = "ignore"
    theirs_env = dict(env, PYTHONPATH=args.megatron_lm_pythonpath)
    common = [
        "--input",
        str(args.input),
        "--tokenizer-type",
        args.tokenizer_type,
        "--tokenizer-model",
        str(args.tokenizer_model),
        "--workers",
        str(args.workers),
        "--append-eod",
    ]
    with tempfile.TemporaryDirectory(dir=args.output_dir) as tmp:
        out = Path(tmp)
        ours_cmd = [
            sys.executable,
            str(ROOT / "tools" / "preprocess_data.py"),
            *common,
            "--output-prefix",
            str(out / "ours"),
            "--overwrite",
            "--no-progress",
        ]
        theirs_cmd = [
            sys.executable,
            str(theirs_tool),
            *common,
            "--output-prefix",
            str(out / "theirs"),
            "--log-interval",
            "100000000",
        ]
        ratios, cpu_ratios, identical = [], [], True
        print(
            f"input {args.input} ({args.input.stat().st_size / 2**20:.1f} MiB), {args.tokenizer_type} "
            f"{args.tokenizer_model}, --workers {args.workers}"
        )
        print(
            f"{'round':>5} | {'ours s':>7} | {'ours tok/s':>10} | {'M-LM s':>7} | {'M-LM tok/s':>10} | "
            f"{'ratio':>5} | {'ours CPU s':>10} | {'M-LM CPU s':>10} | {'CPU ratio':>9} | identical"
        )
        for round_ in range(args.rounds):
            order = [("ours", ours_cmd, env), ("theirs", theirs_cmd, theirs_env)]
            if round_ % 2:
                order.reverse()
            measured = {name: run(cmd, e) for name, cmd, e in order}
            seconds = {name: wall for name, (wall, _) in measured.items()}
            cpu = {name: cpu_s for name, (_, cpu_s) in measured.items()}
            tokens = tokens_in(out / "ours_text_document")
            same = all(
                filecmp.cmp(
                    out / f"ours_text_document{ext}", out / f"theirs_text_document{ext}", shallow=False
                )
                for ext in (".bin", ".idx")
            )
            identical &= same
            ratio = seconds["theirs"] / seconds["ours"]
            ratios.append(ratio)
            cpu_ratios.append(cpu["theirs"] / cpu["ours"])
            print(
                f"{round_ + 1:>5} | {seconds['ours']:7.2f} | {tokens / seconds['ours']:10.0f} | "
                f"{seconds['theirs']:7.2f} | {tokens / seconds['theirs']:10.0f} | {ratio:5.2f} | "
                f"{cpu['ours']:10.2f} | {cpu['theirs']:10.2f} | {cpu_ratios[-1]:9.2f} | {same}"
            )
            for name in ("ours", "theirs"):
                for ext in (".bin", ".idx"):
                    (out / f"{name}_text_document{ext}").unlink()
        print(
            f"tokens: {tokens}; tokens/s ours / Megatron-LM: median {statistics.median(ratios):.2f}x "
            f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x over {args.rounds} rounds); "
            f"CPU seconds Megatron-LM / ours: median {statistics.median(cpu_ratios):.2f}x; "
            f"outputs byte-identical in every round: {identical}"
        )


if __name__ == "__main__":
    main()
