"""Shared test utilities: launching multi-process runs with torchrun on gloo, reading their results."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"

MINIMAL_RUN_FLAGS = [
    "--num-layers",
    "4",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "32",
    "--micro-batch-size",
    "2",
    "--train-iters",
    "10",
    "--tokenizer-type",
    "SentencePieceTokenizer",
    "--tokenizer-model",
    "tok.model",
    "--domains",
    "d.yaml",
]
"""The fewest flags a run parses with (files are not opened): unit tests of the command line add to them."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)  # a child picks its own rendezvous; never inherit one

    if extra:
        env.update(extra)
    return env


def torchrun(
    script: str | Path,
    nproc: int,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: int = 600,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``script`` under torchrun with ``nproc`` local processes (gloo on CPU)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "--master_addr=127.0.0.1",
        str(script),
        *map(str, args),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=subprocess_env(env), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script} (nproc={nproc}) failed with {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc


def python(
    *args: str, env: dict[str, str] | None = None, timeout: int = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``python args...`` from the repository root."""
    proc = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=REPO_ROOT,
        env=subprocess_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"python {' '.join(map(str, args))} failed with {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc


def train_sentencepiece(
    corpus: str | Path, prefix: str | Path, *, vocab_size: int
) -> subprocess.CompletedProcess:
    """``tools/train_tokenizer.py`` on one JSONL file, one thread (reproducible); writes ``prefix.model``."""
    return python(
        "tools/train_tokenizer.py",
        "--input",
        corpus,
        "--output-prefix",
        prefix,
        "--vocab-size",
        str(vocab_size),
        "--num-threads",
        "1",
    )


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())
