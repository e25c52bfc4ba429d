"""The DDK controller's signal: the paper's perplexity ratio, or the KD gap (``--ddk-signal kd-gap``)."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_ddk.ddk.controller import DDKController
from megatron_ddk.errors import CheckpointError


def controller(mixing: str, signal: str) -> DDKController:
    return DDKController(
        mixing=mixing,
        alpha=0.5,
        interval=10,
        domain_names=["a", "b"],
        static_weights=[1.0, 1.0],
        log_file=None,
        dynamic=True,
        signal=signal,
    )


def test_kd_gap_replaces_the_log_ratio_hand_worked():
    # ddk-log: r_0 ~ ratio^(1/tau) with ratio = exp(gap) -> softmax([0.5, 1.5]) = [1, e] / (1 + e)
    c = controller("ddk-log", "kd-gap")
    ce_s, ce_t = np.array([3.0, 2.0]), np.array([1.0, 1.9])  # ppl ratios e^2 and e^0.1: would favour "a"
    r0 = c.start(ce_s, ce_t, kd_gap=np.array([0.5, 1.5]))
    np.testing.assert_allclose(r0, [1 / (1 + np.e), np.e / (1 + np.e)], rtol=1e-12)  # [0.2689, 0.7311]
    # Eq. 2 in log space: psi ~ r_0 * exp(gap); gaps [1, 1] keep r_0's shape, then mix with uniform
    r1 = c.update(r0, ce_s, iteration=10, kd_gap=np.array([1.0, 1.0]))
    np.testing.assert_allclose(r1, 0.5 * r0 + 0.25, rtol=1e-12)
    assert c.last_record["kd_gap"] == [1.0, 1.0] and c.last_record["signal"] == "kd-gap"
    assert c.last_record["ratio"] == pytest.approx(list(np.exp(ce_s - ce_t)))  # still reported


def test_kd_gap_with_the_paper_update():
    # ddk: Eq. 1 = softmax over the ratios, here exp(gap) = [e^0, e^1] = [1, e]
    c = controller("ddk", "kd-gap")
    r0 = c.start(np.array([2.0, 2.0]), np.array([1.0, 1.0]), kd_gap=np.array([0.0, 1.0]))
    expected = np.exp([1.0, np.e]) / np.exp([1.0, np.e]).sum()  # [0.1523, 0.8477]
    np.testing.assert_allclose(r0, expected, rtol=1e-12)


def test_a_small_negative_gap_is_zero():
    """A divergence is >= 0; float noise below 0 (identical models) is clipped, not amplified."""
    c = controller("ddk-log", "kd-gap")
    r0 = c.start(np.ones(2), np.ones(2), kd_gap=np.array([-1e-9, 0.0]))
    np.testing.assert_allclose(r0, [0.5, 0.5], rtol=1e-12)


def test_kd_gap_needs_the_measurement():
    c = controller("ddk-log", "kd-gap")
    with pytest.raises(RuntimeError, match="did not measure the KD gap"):
        c.start(np.ones(2), np.ones(2))


def test_the_ppl_ratio_signal_ignores_a_gap_and_logs_as_before():
    c = controller("ddk-log", "ppl-ratio")
    ce_s, ce_t = np.array([3.0, 2.0]), np.array([1.0, 1.9])
    r0 = c.start(ce_s, ce_t, kd_gap=np.array([0.5, 1.5]))
    ratio = np.exp(ce_s - ce_t)
    np.testing.assert_allclose(r0, ratio / ratio.sum(), rtol=1e-12)
    assert "kd_gap" not in c.last_record and "signal" not in c.last_record  # the JSONL of earlier versions


def test_resume_refuses_another_signal_and_reads_old_checkpoints():
    saved = controller("ddk-log", "kd-gap")
    saved.start(np.ones(2), np.ones(2), kd_gap=np.array([0.1, 0.2]))
    state = saved.state_dict()
    with pytest.raises(CheckpointError, match="--ddk-signal kd-gap, this run --ddk-signal ppl-ratio"):
        controller("ddk-log", "ppl-ratio").load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "signal"}  # saved before --ddk-signal existed
    controller("ddk-log", "ppl-ratio").load_state_dict(old)
    with pytest.raises(CheckpointError):
        controller("ddk-log", "kd-gap").load_state_dict(old)
