"""Launch ``pretrain_ddk.py`` (torchrun, gloo) on the tiny corpus and read its Megatron-style log lines."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import REPO_ROOT, python, torchrun

STUDENT = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--num-query-groups",
    "2",
    "--ffn-hidden-size",
    "128",
    "--swiglu",
    "--disable-bias-linear",
    "--untie-embeddings-and-output-weights",
    "--seq-length",
    "32",
]
TEACHER = [
    "--num-layers",
    "4",
    "--hidden-size",
    "96",
    "--num-attention-heads",
    "4",
    "--num-query-groups",
    "2",
    "--ffn-hidden-size",
    "192",
    "--swiglu",
    "--disable-bias-linear",
    "--untie-embeddings-and-output-weights",
    "--seq-length",
    "32",
]

SERIES_RTOL = 2e-5
"""Layouts (TP/PP/DP, resumed or not) must reproduce a reference run's losses to this relative tolerance."""

_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|(.*)")
_VALUE = re.compile(r"\s*([a-z][a-z /]*?): ([-+0-9.Ee]+|nan)\s*$")


@dataclass
class RunResult:
    stdout: str
    stderr: str
    returncode: int
    metrics: dict[int, dict[str, float]]

    def series(self, key: str) -> list[float]:
        return [self.metrics[i][key] for i in sorted(self.metrics)]


def data_args(corpus: dict, cache: Path) -> list[str]:
    return [
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        str(corpus["tokenizer"]),
        "--domains",
        str(corpus["registry"]),
        "--data-cache-path",
        str(cache),
    ]


def evaluation_args(
    corpus: dict, registry: Path, data_cache: Path, *, split: str, num_samples: int, micro_batch_size: int
) -> list[str]:
    """tools/evaluate.py's data flags for a test corpus (sequence length 32, as the test runs train)."""
    return [
        "--domains",
        str(registry),
        "--split",
        split,
        "--num-samples",
        str(num_samples),
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        str(corpus["tokenizer"]),
        "--seq-length",
        "32",
        "--micro-batch-size",
        str(micro_batch_size),
        "--data-cache-path",
        str(data_cache),
    ]


def train_args(iters: int, *, gbs: int = 8, mbs: int = 2) -> list[str]:
    return [
        "--micro-batch-size",
        str(mbs),
        "--global-batch-size",
        str(gbs),
        "--train-iters",
        str(iters),
        "--lr",
        "1e-3",
        "--min-lr",
        "1e-4",
        "--lr-warmup-iters",
        "1",
        "--log-interval",
        "1",
        "--ddk-val-samples",
        "8",
        "--seed",
        "1234",
    ]


def parse_metrics(stdout: str) -> dict[int, dict[str, float]]:
    metrics: dict[int, dict[str, float]] = {}
    for line in stdout.splitlines():
        match = _LINE.search(line)
        if not match:
            continue
        values = {}
        for part in match.group(2).split("|"):
            item = _VALUE.match(part)
            if item:
                values[item.group(1)] = float(item.group(2))
        metrics[int(match.group(1))] = values
    return metrics


def pretrain(nproc: int, *args: str, check: bool = True, timeout: int = 600) -> RunResult:
    """``pretrain_ddk.py`` under torchrun with ``nproc`` processes; one process runs as a plain
    ``python pretrain_ddk.py`` (a supported launch: it makes its own local rendezvous), which saves the
    torchrun agent's start-up (~2 s) per run."""
    if nproc == 1:
        proc = python("pretrain_ddk.py", *map(str, args), check=False, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"pretrain_ddk.py failed with {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n"
                f"--- stderr ---\n{proc.stderr[-8000:]}"
            )
    else:
        proc = torchrun(REPO_ROOT / "pretrain_ddk.py", nproc, *map(str, args), check=check, timeout=timeout)
    return RunResult(proc.stdout, proc.stderr, proc.returncode, parse_metrics(proc.stdout))


def assert_series_close(a: list[float], b: list[float], rtol: float = SERIES_RTOL) -> None:
    """Two non-empty loss series of equal length agree value by value to ``rtol``."""
    assert len(a) == len(b) and a, (a, b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rtol * abs(y), (a, b)
