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


def torchrun_command(script: str | Path, nproc: int, *args: str) -> list[str]:
    """The command line that runs ``script`` under torchrun with ``nproc`` local processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "--master_addr=127.0.0.1",
        str(script),
        *map(str, args),
    ]


def torchrun(
    script: str | Path,
    nproc: int,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: int = 600,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``script`` under torchrun with ``nproc`` local processes (gloo on CPU)."""
    cmd = torchrun_command(script, nproc, *args)
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


def session_processes(session: int) -> list[int]:
    """Live (not zombie) processes of a session (``start_new_session=True``), from /proc."""
    return [pid for pid, stat in _proc_stats() if stat[3] == session and stat[0] != "Z"]


def child_processes(parent: int) -> list[int]:
    """Live processes whose parent is ``parent``, from /proc."""
    return [pid for pid, stat in _proc_stats() if stat[1] == parent and stat[0] != "Z"]


def _proc_stats() -> list[tuple[int, tuple]]:
    """(pid, (state, ppid, pgrp, session)) of every process, from /proc/*/stat."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found.append((int(stat.parent.name), (fields[0], int(fields[1]), int(fields[2]), int(fields[3]))))
    return found
