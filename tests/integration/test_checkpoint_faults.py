"""Hostile and damaged checkpoints, NaN and layout mistakes, through ``pretrain_ddk.py`` itself: each is
one line on stderr (no traceback), before training where the check allows, and nothing written is lost."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megatron_ddk.checkpointing import iteration_dir, read_tracker
from tests import checkpoint_faults as faults
from tests.helpers import REPO_ROOT, SCRIPTS, python, session_processes, subprocess_env
from tests.runs import STUDENT, assert_series_close, data_args, pretrain, train_args

pytestmark = pytest.mark.slow


def cpt(corpus, tmp, iters, *extra):
    return [*STUDENT, *train_args(iters), *data_args(corpus, tmp / "cache"), "--ddk-mode", "cpt", *extra]


def one_line_failure(run) -> str:
    """The one error line; no traceback through our code (torchrun adds its own report of the exit).

    Every rank that gets to print says the same line (ranks > 0 with a ``[rank N]`` prefix); which ranks
    print before torchrun stops the others when the first one exits is a race, so any of them counts."""
    assert run.returncode != 0
    lines = {
        re.sub(r"^\[rank \d+\] ", "", line)
        for line in run.stderr.splitlines()
        if re.match(r"^(\[rank \d+\] )?pretrain_ddk\.py: error:", line)
    }
    frames = [line for line in run.stderr.splitlines() if line.strip().startswith('File "') and "ddk" in line]
    assert len(lines) == 1 and not frames, run.stderr[-3000:]
    return lines.pop()


@pytest.fixture(scope="module")
def saved(tiny_corpus, tmp_path_factory):
    """Two iterations of CPT saved after each (iter_0000001, iter_0000002)."""
    tmp = tmp_path_factory.mktemp("faults_ref")
    run = pretrain(1, *cpt(tiny_corpus, tmp, 2, "--save", tmp / "ckpt", "--save-interval", "1"))
    return tmp / "ckpt", run


def damaged_copy(saved, tmp_path):
    root, _ = saved
    copy = tmp_path / "ckpt"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("data_cache", "*.jsonl"))
    return copy


def test_payload_in_the_index_of_a_teacher_never_runs(tiny_corpus, tmp_path, saved):
    teacher = damaged_copy(saved, tmp_path)
    marker = tmp_path / "PWNED"
    faults.plant_in_metadata(iteration_dir(teacher, 2), marker, stealth=True)
    faults.rewrite_manifest(iteration_dir(teacher, 2))
    run = pretrain(
        1,
        *STUDENT,
        *train_args(2),
        *data_args(tiny_corpus, tmp_path / "cache"),
        "--ddk-mode",
        "kd",
        "--teacher-load",
        teacher,
        check=False,
    )
    line = one_line_failure(run)
    assert not marker.exists() and "iteration" not in run.stdout
    assert ".metadata refers to tests.checkpoint_faults._stealth" in line and "refusing" in line


def test_payload_in_a_shard_never_runs_on_resume(tiny_corpus, tmp_path, saved):
    ckpt = damaged_copy(saved, tmp_path)
    marker = tmp_path / "PWNED"
    faults.plant_in_shard(iteration_dir(ckpt, 2), marker)
    faults.rewrite_manifest(iteration_dir(ckpt, 2))
    run = pretrain(1, *cpt(tiny_corpus, tmp_path, 3, "--load", ckpt), check=False)
    line = one_line_failure(run)
    assert not marker.exists() and "iteration        3" not in run.stdout
    assert "_extra_state" in line and "not plain data" in line and "exec" in line


def test_flipped_shard_names_the_file_and_the_intact_checkpoint_to_resume_from(tiny_corpus, tmp_path, saved):
    _, reference = saved
    ckpt = damaged_copy(saved, tmp_path)
    shard = sorted(iteration_dir(ckpt, 2).glob("*.distcp"))[0]
    faults.flip_bytes(shard)
    args = cpt(tiny_corpus, tmp_path, 2, "--load", ckpt, "--save", ckpt)
    line = one_line_failure(pretrain(1, *args, check=False))
    assert str(shard) in line and "checksum" in line and f"use --load {ckpt} --ckpt-step 1" in line
    assert read_tracker(ckpt) == 2 and shard.exists()  # nothing was touched
    resumed = pretrain(1, *args, "--ckpt-step", "1")
    assert sorted(resumed.metrics) == [2]
    assert_series_close(resumed.series("lm loss"), reference.series("lm loss")[1:])


def test_huge_learning_rate_stops_without_saving_the_nan(tiny_corpus, tmp_path):
    ckpt = tmp_path / "ckpt"
    args = cpt(tiny_corpus, tmp_path, 6, "--save", ckpt, "--save-interval", "1")
    args[args.index("--lr") + 1] = "1e6"
    run = pretrain(1, *args, check=False)
    line = one_line_failure(run)
    bad = int(line.split("iteration ")[1].split(":")[0])
    assert "non-finite" in line and "grad norm" in line
    assert read_tracker(ckpt) == bad - 1 and not iteration_dir(ckpt, bad).exists()


def test_teacher_with_a_nan_weight_is_named(tiny_corpus, tmp_path, saved):
    root, _ = saved
    python(SCRIPTS / "poison_checkpoint.py", root, tmp_path / "teacher")
    run = pretrain(
        1,
        *STUDENT,
        *train_args(2),
        *data_args(tiny_corpus, tmp_path / "cache"),
        "--ddk-mode",
        "kd",
        "--teacher-load",
        tmp_path / "teacher",
        "--save",
        tmp_path / "ckpt",
        check=False,
    )
    line = one_line_failure(run)
    assert "non-finite teacher validation loss" in line and f"--teacher-load {tmp_path / 'teacher'}" in line
    assert read_tracker(tmp_path / "ckpt") is None


def test_layout_mistakes_are_reported_together_before_any_model(tiny_corpus, tmp_path):
    flags = [
        *STUDENT,
        *train_args(2),
        *data_args(tiny_corpus, tmp_path / "cache"),
        "--ddk-mode",
        "cpt",
        "--position-embedding-type",
        "learned_absolute",
        "--max-position-embeddings",
        "16",
        "--num-attention-heads",
        "2",
        "--num-query-groups",
        "1",
        "--tensor-model-parallel-size",
        "2",
    ]
    run = pretrain(2, *flags, check=False)
    assert "iteration" not in run.stdout
    one_line_failure(run)
    assert "--seq-length 32 exceeds --max-position-embeddings 16 (learned_absolute positions)" in run.stderr
    assert "--num-query-groups 1 is not divisible by --tensor-model-parallel-size 2" in run.stderr


def test_killed_rank_leaves_no_helper_process(tiny_corpus, tmp_path):
    """dist_checkpointing's writer workers and result queue must not outlive a SIGKILLed rank."""
    args = cpt(tiny_corpus, tmp_path, 50, "--save", tmp_path / "ckpt", "--save-interval", "1")
    proc = subprocess.Popen(
        [sys.executable, "-u", "pretrain_ddk.py", *map(str, args)],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    for line in proc.stdout:
        if "successfully saved checkpoint at iteration       2" in line:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 5
    while session_processes(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert session_processes(proc.pid) == []
