"""``--async-save``: checkpoints written by background processes are the synchronous save's, published in
the same order (the tracker last), resume exactly, and a kill while one is written leaves the previous
checkpoint as the newest (docs/CHECKPOINTS.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
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
    torchrun,
    torchrun_command,
)
from tests.integration.test_checkpoint_faults import one_line_failure
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
        torchrun_command(SCRIPTS / "pretrain_faulty_async_save.py", 2, *args),
        cwd=REPO_ROOT,
        env=subprocess_env(
            {
                "ASYNC_SAVE_FAULT": "stall",
                "ASYNC_SAVE_FAULT_ITERATION": "4",
                "ASYNC_SAVE_FAULT_MARKERS": str(tmp_path),
            }
        ),
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


def test_a_failed_background_write_stops_the_run_in_one_line_and_publishes_nothing(tiny_corpus, tmp_path):
    ckpt = tmp_path / "ckpt"
    run = torchrun(
        SCRIPTS / "pretrain_faulty_async_save.py",
        2,
        *cpt(tiny_corpus, tmp_path, ckpt, "--async-save"),
        env={"ASYNC_SAVE_FAULT": "die", "ASYNC_SAVE_FAULT_ITERATION": "4"},
        check=False,
    )
    line = one_line_failure(run)
    assert f"the background save to {iteration_dir(ckpt, 4)} failed" in line, line
    if any(line.startswith("pretrain_ddk.py: error:") for line in run.stderr.splitlines()):
        # rank 0 got to its error line, so it logged the writers' exceptions before (torchrun may stop
        # it earlier, when another rank exits first)
        assert "background checkpoint writer of rank 1 failed" in run.stdout, run.stdout[-2000:]
    assert read_tracker(ckpt) == 2 and not iteration_dir(ckpt, 4).exists()


def test_a_save_in_flight_when_a_non_finite_loss_stops_the_run_is_published(tiny_corpus, tmp_path):
    """Every write takes 3 s longer: the last good save is still being written when the run stops."""
    ckpt = tmp_path / "ckpt"
    args = cpt(tiny_corpus, tmp_path, ckpt, "--async-save", "--save-interval", "1")
    args[args.index("--lr") + 1] = "1e6"
    args[args.index("--train-iters") + 1] = "6"
    run = torchrun(
        SCRIPTS / "pretrain_faulty_async_save.py", 2, *args, env={"ASYNC_SAVE_FAULT": "slow"}, check=False
    )
    line = one_line_failure(run)
    bad = int(line.split("iteration ")[1].split(":")[0])
    assert "non-finite" in line and bad > 1, line
    assert f"published async checkpoint at iteration {bad - 1:7d}" in run.stdout
    assert read_tracker(ckpt) == bad - 1 and not iteration_dir(ckpt, bad).exists()


BACKGROUND_WRITER = textwrap.dedent(
    """
    import multiprocessing, time
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron_ddk.platform.helper_processes import use_write_results_queue

    use_write_results_queue(background=True)
    results = filesystem_async._get_write_results_queue()
    big = {0: [f"{i:0100d}" for i in range(5000)]}  # 0.5 MB: more than a pipe holds
    writer = multiprocessing.get_context("fork").Process(target=results.put, args=(big,))
    writer.start()
    writer.join(timeout=60)  # through a pipe-backed queue, the writer would wait for a reader to exit
    assert writer.exitcode == 0, writer.exitcode
    assert results.get_nowait() == big
    use_write_results_queue(background=False)
    assert type(filesystem_async._get_write_results_queue()).__module__ == "queue"
    print(*[child.pid for child in multiprocessing.active_children()], flush=True)  # the manager's server
    time.sleep(600)
    """
)


def test_background_writer_results_cross_back_through_a_manager_that_dies_with_the_rank():
    """platform/helper_processes.py, in a child interpreter (no at-fork hook or manager in pytest's)."""
    rank = subprocess.Popen(
        [sys.executable, "-c", BACKGROUND_WRITER],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        servers = [int(pid) for pid in rank.stdout.readline().split()]
        assert len(servers) == 1, servers
        os.kill(rank.pid, signal.SIGKILL)
        rank.wait()
        deadline = time.time() + 10
        while session_processes(rank.pid) and time.time() < deadline:
            time.sleep(0.2)
        assert session_processes(rank.pid) == []
    finally:
        if rank.poll() is None:
            os.killpg(rank.pid, signal.SIGKILL)


def test_the_save_strategy_can_write_in_the_background():
    """--async-save needs an async-capable strategy: megatron-core 0.16.1's torch_dist (the only one
    this project writes) is one."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.base import AsyncSaveShardedStrategy

    assert isinstance(get_default_save_sharded_strategy(), AsyncSaveShardedStrategy)
