"""KD (frozen teacher, static mixture) end to end: layouts agree, only the student learns, bad set-ups fail early."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.checkpoint_faults import rewrite_manifest
from tests.helpers import SCRIPTS, read_json, torchrun
from tests.runs import STUDENT, TEACHER, assert_series_close, data_args, pretrain, train_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def teacher(tiny_corpus, tmp_path_factory):
    """A small teacher trained briefly with --ddk-mode cpt (4 layers, hidden 96)."""
    tmp = tmp_path_factory.mktemp("teacher")
    pretrain(
        1,
        *TEACHER,
        *train_args(8),
        *data_args(tiny_corpus, tmp / "cache"),
        "--ddk-mode",
        "cpt",
        "--save",
        tmp / "ckpt",
    )
    return tmp / "ckpt"


def kd(corpus, tmp, teacher_dir, iters, *extra):
    return [
        *STUDENT,
        *train_args(iters),
        *data_args(corpus, tmp / "cache"),
        "--ddk-mode",
        "kd",
        "--teacher-load",
        str(teacher_dir),
        *extra,
    ]


@pytest.fixture(scope="module")
def kd_reference(tiny_corpus, tmp_path_factory, teacher):
    tmp = tmp_path_factory.mktemp("kd_ref")
    run = pretrain(1, *kd(tiny_corpus, tmp, teacher, 6, "--save", tmp / "ckpt", "--save-interval", "1"))
    return tmp, run


def test_kd_run_reports_losses_and_kl_falls(kd_reference):
    _, run = kd_reference
    kd_losses = run.series("kd loss")
    assert len(kd_losses) == 6 and all(v > 0 for v in kd_losses)
    assert kd_losses[-1] < kd_losses[0]
    assert all("teacher lm loss" in m and "lm loss" in m for m in run.metrics.values())
    # the teacher is frozen: its loss on the batches is a property of the data alone, not of training
    assert "teacher ppl" in run.stdout


def test_teacher_loss_depends_only_on_the_data(tiny_corpus, tmp_path, teacher, kd_reference):
    """Another student (learning rate, KD weight) on the same data: its own loss moves apart while the
    frozen teacher's loss on each batch stays exactly the reference's."""
    _, ref = kd_reference
    run = pretrain(1, *kd(tiny_corpus, tmp_path, teacher, 3, "--lr", "5e-3", "--kd-weight", "1.0"))
    assert run.series("teacher lm loss") == ref.series("teacher lm loss")[:3]
    assert run.series("lm loss")[0] == ref.series("lm loss")[0]  # same batch, same initial student
    assert run.series("lm loss")[2] != ref.series("lm loss")[2]  # ... then the students differ


def test_kd_tp2_matches_tp1(tiny_corpus, tmp_path, teacher, kd_reference):
    _, ref = kd_reference
    run = pretrain(2, *kd(tiny_corpus, tmp_path, teacher, 3, "--tensor-model-parallel-size", "2"))
    assert_series_close(run.series("lm loss"), ref.series("lm loss")[:3])
    assert_series_close(run.series("kd loss"), ref.series("kd loss")[:3])


@pytest.mark.parametrize(
    "nproc,layout",
    [
        (2, ["--pipeline-model-parallel-size", "2"]),
        (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    ],
    ids=["pp2", "tp2xpp2"],
)
def test_kd_pipeline_layouts_match_tp1(tiny_corpus, tmp_path, teacher, kd_reference, nproc, layout):
    """Student resumed from the TP1 checkpoint of iteration 1, teacher resharded from its own checkpoint."""
    tmp, ref = kd_reference
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copytree(tmp / "ckpt" / "iter_0000001", ckpt / "iter_0000001")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1\n")
    run = pretrain(nproc, *kd(tiny_corpus, tmp_path, teacher, 3, "--load", ckpt, *layout))
    assert_series_close(run.series("lm loss"), ref.series("lm loss")[1:3])
    assert_series_close(run.series("kd loss"), ref.series("kd loss")[1:3])
    assert_series_close(run.series("teacher lm loss"), ref.series("teacher lm loss")[1:3])


def test_kd_with_student_recompute_matches(tiny_corpus, tmp_path, teacher, kd_reference):
    """--recompute-* applies to the student only; losses (CE, KD, teacher CE) are those without it."""
    _, ref = kd_reference
    run = pretrain(
        1,
        *kd(
            tiny_corpus,
            tmp_path,
            teacher,
            3,
            "--recompute-granularity",
            "full",
            "--recompute-method",
            "uniform",
            "--recompute-num-layers",
            "1",
        ),
    )
    for key in ("lm loss", "kd loss", "teacher lm loss"):
        assert_series_close(run.series(key), ref.series(key)[:3])


def test_gradients_reach_only_the_student(tiny_corpus, tmp_path, teacher):
    out = tmp_path / "grads.json"
    torchrun(SCRIPTS / "distill_grads.py", 1, out, *kd(tiny_corpus, tmp_path, teacher, 2))
    result = read_json(out)
    assert result["student_with_grad"] == result["student_params"] == result["student_changed"]
    assert result["optimizer_params"] == result["student_params"]
    assert result["teacher_requires_grad"] == 0 and result["teacher_with_grad"] == 0
    assert result["teacher_unchanged"] and result["teacher_equals_checkpoint"]
    assert result["teacher_training_mode"] is False


def _edited_teacher(teacher, tmp_path, edit):
    copy = tmp_path / "teacher_copy"
    shutil.copytree(teacher, copy)
    tracker = (copy / "latest_checkpointed_iteration.txt").read_text().strip()
    meta_path = copy / f"iter_{int(tracker):07d}" / "ddk_checkpoint.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    rewrite_manifest(meta_path.parent)  # a consistent checkpoint of another teacher, not a damaged one
    return copy


def _fails(tiny_corpus, tmp_path, teacher_dir, *extra, nproc=1):
    run = pretrain(nproc, *kd(tiny_corpus, tmp_path, teacher_dir, 2, *extra), check=False)
    assert run.returncode != 0
    assert "iteration" not in run.stdout  # failed before training started
    return run.stderr


def test_missing_teacher_checkpoint(tiny_corpus, tmp_path):
    err = _fails(tiny_corpus, tmp_path, tmp_path / "nope")
    assert "--teacher-load" in err and "no such directory" in err


def test_tokenizer_mismatch(tiny_corpus, tmp_path, teacher):
    bad = _edited_teacher(teacher, tmp_path, lambda m: m["tokenizer"].update(sha256="0" * 64))
    err = _fails(tiny_corpus, tmp_path, bad)
    assert "different tokenizer" in err


def test_vocabulary_size_mismatch(tiny_corpus, tmp_path, teacher):
    def edit(meta):
        meta["model"]["vocab_size"] = 700
        meta["tokenizer"]["vocab_size"] = 700

    err = _fails(tiny_corpus, tmp_path, _edited_teacher(teacher, tmp_path, edit))
    assert "share a vocabulary" in err


def test_pipeline_split_must_divide_teacher(tiny_corpus, tmp_path, teacher):
    bad = _edited_teacher(teacher, tmp_path, lambda m: m["model"].update(num_layers=3))
    err = _fails(tiny_corpus, tmp_path, bad, "--pipeline-model-parallel-size", "2", nproc=2)
    assert "not divisible by --pipeline-model-parallel-size 2" in err
