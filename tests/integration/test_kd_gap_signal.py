"""``--ddk-signal kd-gap``: DDK's factor from the student's per-domain KD divergence on the validation sets.

The gap is measured with the teacher at every update, is the same at TP=2 as at TP=1, drives the weights
exactly as the perplexity ratio would (ratio = exp(gap)), and from a top-k cache it is the divergence of
the k + 1 buckets, which can only be smaller than the full-vocabulary one (coarser partition)."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_ddk.ddk import factor
from tests.integration.test_ddk import ddk, read_log
from tests.integration.test_distillation import teacher  # noqa: F401  (session fixture)
from tests.integration.test_teacher_cache import cache  # noqa: F401  (module fixture)
from tests.integration.test_teacher_cache import ddk as cached_ddk
from tests.runs import pretrain

pytestmark = pytest.mark.slow
SIGNAL = ["--ddk-signal", "kd-gap", "--ddk-mixing", "ddk-log", "--ddk-interval", "2", "--kd-weight", "0.5"]


@pytest.fixture(scope="module")
def online(tiny_corpus, tmp_path_factory, teacher):  # noqa: F811
    tmp = tmp_path_factory.mktemp("kd_gap")
    run = pretrain(1, *ddk(tiny_corpus, tmp, teacher, 4, *SIGNAL, "--save", tmp / "ckpt"))
    return run, read_log(tmp / "ckpt" / "ddk_log.jsonl")


def test_gap_is_measured_at_every_update_and_drives_the_weights(online):
    run, log = online
    assert [r["iteration"] for r in log] == [0, 2]
    for record in log:
        assert record["signal"] == "kd-gap" and all(g > 0 for g in record["kd_gap"])
        # the perplexity ratio is still reported; the factor is computed from exp(gap) instead
        np.testing.assert_allclose(
            record["ratio"], np.exp(np.subtract(record["ce_student"], record["ce_teacher"])), rtol=1e-9
        )
    assert log[0]["kd_gap"] != log[1]["kd_gap"]  # re-measured after training, not cached like the teacher CE
    gap0, gap1 = (np.array(r["kd_gap"]) for r in log)
    zeros = np.zeros_like(gap0)
    first = factor.next_weights(
        "ddk-log", r_prev=None, ce_student=gap0, ce_teacher=zeros, alpha=0.5, static_weights=np.ones(4)
    )
    np.testing.assert_allclose(log[0]["weights"], first, rtol=1e-9)
    np.testing.assert_allclose(
        first, np.exp(gap0) / np.exp(gap0).sum(), rtol=1e-9
    )  # ratio^1 with ratio = e^gap
    second = factor.next_weights(
        "ddk-log", r_prev=first, ce_student=gap1, ce_teacher=zeros, alpha=0.5, static_weights=np.ones(4)
    )
    np.testing.assert_allclose(log[1]["weights"], second, rtol=1e-9)
    assert "kd gap" in run.stdout


def test_tp2_measures_the_same_gap(tiny_corpus, tmp_path, teacher, online):  # noqa: F811
    _, ref = online
    args = ddk(tiny_corpus, tmp_path, teacher, 4, *SIGNAL, "--save", tmp_path / "ckpt")
    pretrain(2, *args, "--tensor-model-parallel-size", "2")
    log = read_log(tmp_path / "ckpt" / "ddk_log.jsonl")
    for mine, theirs in zip(log, ref, strict=True):
        np.testing.assert_allclose(mine["kd_gap"], theirs["kd_gap"], rtol=1e-4)
        np.testing.assert_allclose(mine["weights"], theirs["weights"], rtol=1e-4)


def test_gap_from_the_top_k_cache_is_the_bucketed_divergence(tiny_corpus, tmp_path, teacher, cache):  # noqa: F811
    """Window 0 (same student weights): the cached top-16 gap is positive and at most the full one."""
    signal = ["--ddk-signal", "kd-gap", "--ddk-mixing", "ddk-log"]
    pretrain(
        1,
        *cached_ddk(
            tiny_corpus, tmp_path / "c", 2, *signal, "--teacher-cache", cache, "--save", tmp_path / "c"
        ),
    )
    pretrain(
        1,
        *cached_ddk(
            tiny_corpus, tmp_path / "o", 2, *signal, "--teacher-load", teacher, "--save", tmp_path / "o"
        ),
    )
    from_cache = np.array(read_log(tmp_path / "c" / "ddk_log.jsonl")[0]["kd_gap"])
    full = np.array(read_log(tmp_path / "o" / "ddk_log.jsonl")[0]["kd_gap"])
    assert np.all(from_cache > 0)
    assert np.all(from_cache <= full * (1 + 1e-5)), (from_cache, full)
