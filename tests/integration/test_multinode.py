"""Two torchrun "nodes" on localhost, launched with the line examples/slurm/common.sh builds (c10d rendezvous):
the same losses as one node with two processes; a node whose peer never joins fails within the join timeout."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, free_port, subprocess_env
from tests.runs import STUDENT, assert_series_close, data_args, parse_metrics, pretrain, train_args

pytestmark = pytest.mark.slow

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def slurm_launch_line(
    nnodes: int, gpus_per_node: int, port: int, job_id: str, args: list[str], **env: str
) -> list[str]:
    """What srun runs on every node: common.sh's ddk_launch with DRY_RUN=1, the srun prefix removed."""
    script = (
        f"source {REPO_ROOT / 'examples/slurm/common.sh'}; NNODES={nnodes}; GPUS_PER_NODE={gpus_per_node}; "
        f'MASTER_PORT={port}; TORCHRUN={shlex.quote(TORCHRUN)}; CONTAINER=; PRETRAIN_ARGS=("$@"); ddk_launch'
    )
    proc = subprocess.run(
        ["bash", "-c", script, "bash", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": "/usr/bin:/bin",
            "DRY_RUN": "1",
            "MASTER_ADDR": "127.0.0.1",
            "SLURM_JOB_ID": job_id,
            **env,
        },
    )
    assert proc.returncode == 0, proc.stderr
    tokens = shlex.split(proc.stdout)
    assert tokens[0] == "srun"
    assert tokens[tokens.index("--rdzv-endpoint") + 1] == f"127.0.0.1:{port}"
    return tokens[tokens.index(TORCHRUN) :]


def start_node(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_two_nodes_match_one_node_with_two_processes(tiny_corpus, tmp_path):
    args = [*STUDENT, *train_args(3), *data_args(tiny_corpus, tmp_path / "cache"), "--ddk-mode", "cpt"]
    cmd = slurm_launch_line(2, 1, free_port(), "rehearsal", args)
    assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--rdzv-backend") + 1] == "c10d"
    nodes = [start_node(cmd) for _ in range(2)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-4000:]
    metrics = {}
    for out, _ in outputs:  # rank 0 (which logs) is on whichever node the rendezvous made first
        metrics.update(parse_metrics(out))
    one_node = pretrain(2, *args)
    assert sorted(metrics) == [1, 2, 3]
    assert_series_close([metrics[i]["lm loss"] for i in (1, 2, 3)], one_node.series("lm loss"))


def test_a_node_that_never_joins_fails_the_other_within_the_timeout(tmp_path):
    """common.sh's ddk_launch itself (srun replaced by a stand-in that runs its command) on one of two nodes."""
    cmd = slurm_launch_line(2, 1, free_port(), "lonely", ["--help"], RDZV_JOIN_TIMEOUT="10")
    assert cmd[cmd.index("--rdzv-conf") + 1] == "join_timeout=10"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (fake_bin / "srun").chmod(0o755)
    script = (
        f"source {REPO_ROOT / 'examples/slurm/common.sh'}; NNODES=2; GPUS_PER_NODE=1; TP=1; PP=1; DP=2; "
        f"MASTER_PORT={free_port()}; TORCHRUN={shlex.quote(TORCHRUN)}; CONTAINER=; "
        f"CKPT_DIR={tmp_path / 'ckpt'}; LOAD_ARGS=(); PRETRAIN_ARGS=(--help); ddk_launch"
    )
    env = subprocess_env(
        {
            "PATH": f"{fake_bin}:/usr/bin:/bin",
            "MASTER_ADDR": "127.0.0.1",
            "SLURM_JOB_ID": "lonely",
            "RDZV_JOIN_TIMEOUT": "10",
        }
    )
    start = time.time()
    proc = subprocess.run(
        ["bash", "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    elapsed = time.time() - start
    assert proc.returncode != 0 and 10 <= elapsed < 90, (proc.returncode, elapsed, proc.stderr[-2000:])
    assert "waiting up to 10 s for all 2 nodes" in proc.stdout
    assert "RendezvousTimeoutError" in proc.stderr
    assert (
        "a RendezvousTimeoutError above means not all 2 nodes reached 127.0.0.1:" in proc.stderr
        and "within 10 s (RDZV_JOIN_TIMEOUT): check that every node started" in proc.stderr
    )
