"""A Mixture-of-Experts teacher at the run's layout: trained briefly as an MoE student (router load-balancing
loss on), then the frozen teacher of a dense student's KD run, where EP=2 must reproduce EP=1's losses."""

from __future__ import annotations

import pytest

from tests.runs import STUDENT, TEACHER, assert_series_close, data_args, pretrain, train_args

pytestmark = pytest.mark.slow

MOE = [
    "--num-experts",
    "4",
    "--moe-router-topk",
    "2",
    "--moe-ffn-hidden-size",
    "64",
    "--moe-aux-loss-coeff",
    "0.01",
]


@pytest.fixture(scope="module")
def moe_teacher(tiny_corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe_teacher")
    run = pretrain(
        1,
        *TEACHER,
        *MOE,
        *train_args(4),
        *data_args(tiny_corpus, tmp / "cache"),
        "--ddk-mode",
        "cpt",
        "--save",
        tmp / "ckpt",
    )
    return tmp / "ckpt", run


def kd_at(corpus, tmp, teacher, ep: int):
    return pretrain(
        2,
        *STUDENT,
        *train_args(3),
        *data_args(corpus, tmp / "cache"),
        "--ddk-mode",
        "kd",
        "--teacher-load",
        teacher,
        "--expert-model-parallel-size",
        str(ep),
    )


def test_moe_student_trains(moe_teacher):
    _, run = moe_teacher
    losses = run.series("lm loss")
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_kd_with_moe_teacher_ep2_matches_ep1(tiny_corpus, tmp_path, moe_teacher):
    teacher, _ = moe_teacher
    ep1 = kd_at(tiny_corpus, tmp_path / "ep1", teacher, 1)
    ep2 = kd_at(tiny_corpus, tmp_path / "ep2", teacher, 2)
    for key in ("lm loss", "kd loss", "teacher lm loss"):
        assert_series_close(ep2.series(key), ep1.series(key))
    assert all(v > 0 for v in ep1.series("kd loss"))


def test_ep_times_tp_not_dividing_the_world_is_refused(tiny_corpus, tmp_path, moe_teacher):
    teacher, _ = moe_teacher
    run = pretrain(
        2,
        *STUDENT,
        *train_args(1, gbs=4),
        *data_args(tiny_corpus, tmp_path / "cache"),
        "--ddk-mode",
        "kd",
        "--teacher-load",
        teacher,
        "--expert-model-parallel-size",
        "2",
        "--tensor-model-parallel-size",
        "2",
        check=False,
    )
    assert (
        run.returncode != 0
        and "--expert-model-parallel-size 2 x --tensor-model-parallel-size 2" in run.stderr
    )
