"""``--async-save``: checkpoints written by background processes are the synchronous save's, published in
the same order (the tracker last), resume exactly, and a kill while one is written leaves the previous
checkpoint as the newest (docs/CHECKPOINTS.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from megatron_ddk.checkpoint_manifest import MANIFEST_FILENAME
from megatron_ddk.checkpointing import iteration_dir, read_tracker
from tests.helpers import (
    REPO_ROOT,
    SCRIPTS,
    child_processes,
    session_processes,
    subprocess_env,
    torchrun_command,
)
from tests.runs import STUDENT, assert_series_close, data_args, pretrain, train_args

pytestmark = pytest.mark.slow

ITERS = 4
SAVED = (2, 4)


def cpt(corpus, tmp, ckpt, *extra) -> list[str]:
    """Two ranks' CPT run saving every 2 iterations (the args of both the reference and async runs)."""
    return [
        *STUDENT,
        *train_args(ITERS),
        *data_args(corpus, tmp / "cache"),
        "--ddk-mode",
        "cpt",
        "--save",
        ckpt,
        "--save-interval",
        "2",
        *extra,
    ]


@pytest.fixture(scope="module")
def synchronous(tiny_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("async_save_reference")
    return tmp / "ckpt", pretrain(2, *cpt(tiny_corpus, tmp, tmp / "ckpt"))


def files_but_the_index(checkpoint) -> dict:
    """The manifest's sizes and checksums of every file but ``.metadata`` (which holds the save's path)."""
    files = json.loads((checkpoint / MANIFEST_FILENAME).read_text())["files"]
    return {name: entry for name, entry in files.items() if name != ".metadata"}


def test_async_saves_equal_the_synchronous_ones_and_publish_in_order(tiny_corpus, tmp_path, synchronous):
    reference_ckpt, reference = synchronous
    run = pretrain(2, *cpt(tiny_corpus, tmp_path, tmp_path / "ckpt", "--async-save"))
    assert run.series("lm loss") == reference.series("lm loss")  # training never waited on a write
    for iteration in SAVED:  # same bytes in every file: the state as it was when the save was scheduled
        assert files_but_the_index(iteration_dir(tmp_path / "ckpt", iteration)) == files_but_the_index(
            iteration_dir(reference_ckpt, iteration)
        )
    lines = run.stdout.splitlines()
    for iteration in SAVED:
        scheduled = [
            i
            for i, line in enumerate(lines)
            if f"scheduled an async checkpoint save at iteration {iteration:7d}" in line
        ]
        published = [
            i
            for i, line in enumerate(lines)
            if f"published async checkpoint at iteration {iteration:7d}" in line
        ]
        assert len(scheduled) == len(published) == 1 and scheduled[0] < published[0], run.stdout[-3000:]
    assert "successfully saved" not in run.stdout
    assert read_tracker(tmp_path / "ckpt") == ITERS and not list((tmp_path / "ckpt").glob("*.tmp"))


def test_kill_during_a_background_save_keeps_the_previous_checkpoint(tiny_corpus, tmp_path, synchronous):
    """The writers of iteration 4's save stall after writing; both ranks are SIGKILLed then."""
    _, reference = synchronous
    ckpt = tmp_path / "ckpt"
    args = cpt(tiny_corpus, tmp_path, ckpt, "--async-save", "--load", ckpt)
    launcher = subprocess.Popen(
        torchrun_command(SCRIPTS / "pretrain_slow_async_save.py", 2, *args),
        cwd=REPO_ROOT,
        env=subprocess_env({"SLOW_SAVE_ITERATION": "4", "SLOW_SAVE_MARKERS": str(tmp_path)}),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        for line in launcher.stdout:
            if "scheduled an async checkpoint save at iteration       4" in line:
                break
        deadline = time.time() + 60
        while len(list(tmp_path.glob("rank*"))) < 2 and time.time() < deadline:
            time.sleep(0.1)  # both writers wrote their shards and stall before reporting
        ranks = child_processes(launcher.pid)
        assert len(ranks) == 2, ranks
        for rank in ranks:  # the ranks only: their writers and queue servers must die with them
            os.kill(rank, signal.SIGKILL)
        launcher.wait(timeout=60)
        deadline = time.time() + 10
        while session_processes(launcher.pid) and time.time() < deadline:
            time.sleep(0.2)
        assert session_processes(launcher.pid) == []
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert read_tracker(ckpt) == 2  # iteration 4 was written, never published
    staging = ckpt / "iter_0000004.tmp"
    assert list(staging.glob("*.distcp")) and not (staging / MANIFEST_FILENAME).exists()
    assert not iteration_dir(ckpt, 4).exists()

    resumed = pretrain(2, *args)
    assert f"loaded checkpoint from {iteration_dir(ckpt, 2)} at iteration 2" in resumed.stdout
    assert sorted(resumed.metrics) == [3, 4]
    assert_series_close(resumed.series("lm loss"), reference.series("lm loss")[2:])
    assert read_tracker(ckpt) == ITERS and not list(ckpt.glob("*.tmp"))  # the stale staging was replaced
    assert (iteration_dir(ckpt, 4) / MANIFEST_FILENAME).exists()
