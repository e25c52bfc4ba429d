"""CPT (student alone) on megatron-core under torchrun/gloo: layouts agree, checkpoints reshard, resume is exact."""

from __future__ import annotations

import json

import pytest

from megatron_ddk.checkpointing import TRACKER_FILENAME, read_metadata
from tests.helpers import train_sentencepiece
from tests.runs import STUDENT, assert_series_close, data_args, pretrain, train_args

pytestmark = pytest.mark.slow


def cpt(corpus, tmp, *extra):
    return [*STUDENT, *train_args(3), *data_args(corpus, tmp / "cache"), "--ddk-mode", "cpt", *extra]


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory):
    """TP1 run of 3 iterations that also saves after iteration 1 (the starting point for PP runs)."""
    tmp = tmp_path_factory.mktemp("cpt_ref")
    run = pretrain(
        1,
        *cpt(
            tiny_corpus,
            tmp,
            "--save",
            tmp / "ckpt",
            "--save-interval",
            "1",
            "--eval-interval",
            "2",
            "--eval-iters",
            "2",
            "--tensorboard-dir",
            tmp / "tb",
        ),
    )
    return tmp, run


def test_loss_decreases_and_checkpoint_is_published(reference):
    tmp, run = reference
    losses = run.series("lm loss")
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (tmp / "ckpt" / TRACKER_FILENAME).read_text().strip() == "3"
    meta = read_metadata(tmp / "ckpt")
    assert meta.iteration == 3 and meta.model.num_layers == 2 and meta.tokenizer["sha256"]
    assert not list((tmp / "ckpt").glob("*.tmp"))
    assert "validation loss at iteration 2 | lm loss value:" in run.stdout  # --eval-interval 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp / "tb"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"lm loss", "learning-rate", "grad-norm", "validation/lm loss"} <= set(scalars)
    assert [e.step for e in events.Scalars("lm loss")] == [1, 2, 3]


@pytest.mark.parametrize(
    "nproc,layout", [(2, ["--tensor-model-parallel-size", "2"]), (2, [])], ids=["tp2", "dp2"]
)
def test_tp2_and_dp2_match_tp1_from_scratch(tiny_corpus, tmp_path, reference, nproc, layout):
    _, ref = reference
    run = pretrain(nproc, *cpt(tiny_corpus, tmp_path, *layout))
    assert_series_close(run.series("lm loss"), ref.series("lm loss"))


@pytest.mark.parametrize(
    "nproc,layout",
    [
        (1, []),
        (2, ["--tensor-model-parallel-size", "2"]),
        (2, ["--pipeline-model-parallel-size", "2"]),
        (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    ],
    ids=["tp1", "tp2", "pp2", "tp2xpp2"],
)
def test_resume_from_tp1_checkpoint_reshards(tiny_corpus, tmp_path, reference, nproc, layout):
    """Load the TP1 checkpoint of iteration 1 at another layout: iterations 2-3 equal the TP1 run."""
    tmp, ref = reference
    import shutil

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copytree(tmp / "ckpt" / "iter_0000001", ckpt / "iter_0000001")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1\n")
    run = pretrain(nproc, *cpt(tiny_corpus, tmp_path, "--load", ckpt, *layout))
    assert sorted(run.metrics) == [2, 3]
    assert_series_close(run.series("lm loss"), ref.series("lm loss")[1:])
    if layout:
        assert "resharded from TP1 PP1 DP1" in run.stdout


def test_exit_and_resume_equals_uninterrupted(tiny_corpus, tmp_path, reference):
    _, ref = reference
    args = cpt(tiny_corpus, tmp_path, "--save", tmp_path / "ckpt", "--load", tmp_path / "ckpt")
    first = pretrain(1, *args, "--exit-interval", "2")
    assert sorted(first.metrics) == [1, 2]
    second = pretrain(1, *args)
    assert sorted(second.metrics) == [3]
    assert_series_close(first.series("lm loss") + second.series("lm loss"), ref.series("lm loss"))


def test_crash_mid_save_keeps_previous_checkpoint(tiny_corpus, tmp_path, reference):
    """A leftover staging directory (crash mid-save) is ignored; the tracker still names a loadable checkpoint."""
    tmp, ref = reference
    import shutil

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copytree(tmp / "ckpt" / "iter_0000001", ckpt / "iter_0000001")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1\n")
    (ckpt / "iter_0000002.tmp").mkdir()
    (ckpt / "iter_0000002.tmp" / "__0_0.distcp").write_bytes(b"half written")
    run = pretrain(1, *cpt(tiny_corpus, tmp_path, "--load", ckpt, "--save", ckpt, "--save-interval", "2"))
    assert_series_close(run.series("lm loss"), ref.series("lm loss")[1:])
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert not (ckpt / "iter_0000002.tmp").exists()


def test_sigterm_saves_and_exits_cleanly(tiny_corpus, tmp_path):
    """--exit-signal-handler: SIGTERM (SLURM pre-emption) ends the run after a checkpoint, exit code 0."""
    import signal
    import subprocess
    import sys

    from megatron_ddk.checkpointing import read_tracker
    from tests.helpers import REPO_ROOT, subprocess_env

    args = [
        *STUDENT,
        *train_args(500),
        *data_args(tiny_corpus, tmp_path / "cache"),
        "--ddk-mode",
        "cpt",
        "--save",
        str(tmp_path / "ckpt"),
        "--exit-signal-handler",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-u", "pretrain_ddk.py", *args],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "iteration        2/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-3000:]
    assert "exiting program at iteration" in out and "SIGTERM received" in out
    saved = read_tracker(tmp_path / "ckpt")
    assert saved is not None and 2 <= saved < 500


def test_distributed_optimizer_with_overlap_matches_and_resumes(tiny_corpus, tmp_path, reference):
    """DP=2 with --use-distributed-optimizer and both overlap flags: same losses as TP1, exact resume
    (stopped after iteration 1, so iteration 3's loss shows the second update from the restored
    optimizer state: Adam's step counts included)."""
    _, ref = reference
    flags = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    args = cpt(tiny_corpus, tmp_path, *flags, "--save", tmp_path / "ckpt", "--load", tmp_path / "ckpt")
    first = pretrain(2, *args, "--exit-interval", "1")
    second = pretrain(2, *args)
    assert sorted(first.metrics) == [1] and sorted(second.metrics) == [2, 3]
    assert_series_close(first.series("lm loss") + second.series("lm loss"), ref.series("lm loss"))


def test_data_from_another_tokenizer_stops_every_rank(tiny_corpus, tmp_path):
    """Rank 0 alone scans the tokens; its one-line error must still end the 2-rank job (no hang)."""
    names = json.loads(tiny_corpus["names"])
    train_sentencepiece(
        tiny_corpus["registry"].parent / f"{names[0]}.jsonl", tmp_path / "small", vocab_size=400
    )
    args = cpt(tiny_corpus, tmp_path)
    args[args.index("--tokenizer-model") + 1] = str(tmp_path / "small.model")
    run = pretrain(2, *args, check=False, timeout=120)
    assert run.returncode != 0 and "iteration" not in run.stdout
    assert "holds token id" in run.stderr and "but the tokenizer has 400 tokens" in run.stderr
