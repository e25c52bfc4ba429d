"""DDK end to end: weights updated every K iterations from per-domain validation, identical on every
rank, logged as JSONL, and reproduced exactly by a resumed run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from tests.integration.test_distillation import teacher  # noqa: F401  (session fixture)
from tests.runs import STUDENT, assert_series_close, data_args, pretrain, train_args

pytestmark = pytest.mark.slow


def ddk(corpus, tmp, teacher_dir, iters, *extra):
    return [
        *STUDENT,
        *train_args(iters),
        *data_args(corpus, tmp / "cache"),
        "--ddk-mode",
        "ddk",
        "--teacher-load",
        str(teacher_dir),
        "--ddk-interval",
        "2",
        *extra,
    ]


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def ddk_reference(tiny_corpus, tmp_path_factory, teacher):  # noqa: F811
    tmp = tmp_path_factory.mktemp("ddk_ref")
    run = pretrain(1, *ddk(tiny_corpus, tmp, teacher, 6, "--save", tmp / "ckpt"))
    return tmp, run, read_log(tmp / "ckpt" / "ddk_log.jsonl")


def test_weights_follow_the_schedule(ddk_reference):
    _, run, log = ddk_reference
    assert [r["iteration"] for r in log] == [0, 2, 4]
    assert [r["window"] for r in log] == [0, 1, 2]
    for record in log:
        assert abs(sum(record["weights"]) - 1) < 1e-9 and min(record["weights"]) > 0
        assert record["ppl_teacher"] == log[0]["ppl_teacher"]  # the teacher is evaluated once
        ratio = np.exp(np.array(record["ce_student"]) - np.array(record["ce_teacher"]))
        np.testing.assert_allclose(record["ratio"], ratio, rtol=1e-9)
    # Eq. 1 at the start: softmax of the perplexity ratios
    r0 = np.exp(log[0]["ratio"]) / np.exp(log[0]["ratio"]).sum()
    np.testing.assert_allclose(log[0]["weights"], r0, rtol=1e-6)
    # Eq. 2 at the first update, alpha = 0.5
    psi = np.array(log[0]["weights"]) * np.exp(log[1]["ratio"])
    expected = 0.5 * psi / psi.sum() + 0.5 / len(psi)
    np.testing.assert_allclose(log[1]["weights"], expected, rtol=1e-6)
    assert "DDK update at iteration 2" in run.stdout and "final weight" in run.stdout


def test_dp2_matches_and_agrees_on_weights(tiny_corpus, tmp_path, teacher, ddk_reference):  # noqa: F811
    _, ref, ref_log = ddk_reference
    run = pretrain(
        2, *ddk(tiny_corpus, tmp_path, teacher, 4, "--save", tmp_path / "ckpt", "--lr-decay-iters", "6")
    )
    log = read_log(tmp_path / "ckpt" / "ddk_log.jsonl")
    assert_series_close(run.series("lm loss"), ref.series("lm loss")[:4])
    assert [r["iteration"] for r in log] == [0, 2] and [r["iteration"] for r in ref_log[:2]] == [0, 2]
    for mine, theirs in zip(log, ref_log[:2], strict=True):
        np.testing.assert_allclose(mine["weights"], theirs["weights"], rtol=1e-6)


@pytest.mark.parametrize("exit_at", [3, 2], ids=["mid-window", "at-update"])
def test_resume_reproduces_uninterrupted_run(tiny_corpus, tmp_path, teacher, ddk_reference, exit_at):  # noqa: F811
    _, ref, ref_log = ddk_reference
    args = ddk(tiny_corpus, tmp_path, teacher, 6, "--save", tmp_path / "ckpt", "--load", tmp_path / "ckpt")
    first = pretrain(1, *args, "--exit-interval", str(exit_at))
    second = pretrain(1, *args)
    assert sorted(first.metrics) == list(range(1, exit_at + 1))
    assert sorted(second.metrics) == list(range(exit_at + 1, 7))
    assert_series_close(first.series("lm loss") + second.series("lm loss"), ref.series("lm loss"))
    assert_series_close(first.series("kd loss") + second.series("kd loss"), ref.series("kd loss"))
    log = read_log(tmp_path / "ckpt" / "ddk_log.jsonl")
    assert [r["iteration"] for r in log] == [0, 2, 4]
    for mine, theirs in zip(log, ref_log, strict=True):
        np.testing.assert_allclose(mine["weights"], theirs["weights"], rtol=1e-9)


def unequal_registry(corpus, tmp):
    """The demo registry with weights 1, 2, 3, ... (absolute prefixes, so it can live in ``tmp``)."""
    registry = yaml.safe_load(corpus["registry"].read_text())
    for i, domain in enumerate(registry["domains"]):
        domain["train"] = str(corpus["registry"].parent / domain["train"])
        domain["weight"] = float(i + 1)
    path = tmp / "unequal_domains.yaml"
    path.write_text(yaml.safe_dump(registry))
    return {**corpus, "registry": path}, np.arange(1, len(registry["domains"]) + 1) / sum(
        range(1, len(registry["domains"]) + 1)
    )


@pytest.mark.parametrize("mixing", ["equal", "static"])
def test_ablation_mixings(tiny_corpus, tmp_path, teacher, mixing):  # noqa: F811
    """Registry weights 1:2:3:4 tell the two apart: static keeps them, equal ignores them."""
    corpus, registry_weights = unequal_registry(tiny_corpus, tmp_path)
    pretrain(1, *ddk(corpus, tmp_path, teacher, 4, "--save", tmp_path / "ckpt", "--ddk-mixing", mixing))
    log = read_log(tmp_path / "ckpt" / "ddk_log.jsonl")
    n = len(registry_weights)
    expected = np.full(n, 1 / n) if mixing == "equal" else registry_weights
    assert [r["iteration"] for r in log] == [0, 2]
    for record in log:
        assert record["mixing"] == mixing
        np.testing.assert_allclose(record["weights"], expected, rtol=1e-9)
