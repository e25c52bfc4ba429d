"""Activation recomputation of the student: same losses as without it; the teacher keeps no activations."""

from __future__ import annotations

import pytest

from tests.helpers import SCRIPTS, python, read_json
from tests.runs import STUDENT, assert_series_close, data_args, pretrain, train_args

pytestmark = pytest.mark.slow

DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
"""Dropout on: recomputation must replay the same random masks (megatron-core saves the RNG states)."""


def cpt(corpus, tmp, *extra):
    return [
        *STUDENT,
        *DROPOUT,
        *train_args(3),
        *data_args(corpus, tmp / "cache"),
        "--ddk-mode",
        "cpt",
        *extra,
    ]


@pytest.fixture(scope="module")
def no_recompute(tiny_corpus, tmp_path_factory):
    return pretrain(1, *cpt(tiny_corpus, tmp_path_factory.mktemp("no_recompute")))


@pytest.mark.parametrize(
    "flags",
    [
        ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
        ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"],
        ["--recompute-granularity", "selective"],
    ],
    ids=["full-uniform", "full-block", "selective"],
)
def test_recompute_gives_the_same_losses(tiny_corpus, tmp_path, no_recompute, flags):
    run = pretrain(1, *cpt(tiny_corpus, tmp_path, *flags))
    assert_series_close(run.series("lm loss"), no_recompute.series("lm loss"))
    assert run.series("grad norm") == pytest.approx(no_recompute.series("grad norm"), rel=1e-4)


def test_teacher_keeps_no_activations(tmp_path):
    """Autograd saves nothing for the teacher's forward (no_grad, eval), with or without student recompute."""
    python(SCRIPTS / "teacher_activations.py", tmp_path / "out.json")
    results = read_json(tmp_path / "out.json")
    for name, r in results.items():
        assert r["student_and_teacher"] == r["student_alone"] > 0, (name, r)
        assert not r["teacher_logits_requires_grad"] and not r["teacher_logits_grad_fn"], (name, r)
        assert (
            r["student_logits_grad_fn"] and not r["teacher_training_mode"] and r["teacher_recompute"] is None
        )
    assert results["full"]["student_alone"] < results["plain"]["student_alone"] / 2
