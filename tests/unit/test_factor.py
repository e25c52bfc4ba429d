"""Eq. 1 and Eq. 2 against values worked out by hand, the numerics guards and the mixing modes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_ddk.ddk import factor


def ce_for_ratios(ratios):
    """CEs whose perplexity ratios are ``ratios`` (teacher CE 1.0 everywhere)."""
    return [1.0 + math.log(r) for r in ratios], [1.0] * len(ratios)


def test_ratio_is_perplexity_quotient_and_clipped():
    np.testing.assert_allclose(factor.perplexity_ratio([2.0, 1.0], [1.0, 1.0]), [math.e, 1.0])
    assert factor.perplexity_ratio([1000.0], [0.0])[0] == factor.MAX_RATIO == pytest.approx(math.exp(50))


def test_eq1_softmax_of_ratios():
    # ratios 1 and 2: softmax = [e^1, e^2] / (e^1 + e^2) = [0.268941..., 0.731058...]
    s, t = ce_for_ratios([1.0, 2.0])
    np.testing.assert_allclose(
        factor.initial_factor(s, t), [0.2689414213699951, 0.7310585786300049], rtol=1e-12
    )


def test_eq1_three_domains():
    # ratios [1.2, 1.5, 1.2]: e^1.2 = 3.320117, e^1.5 = 4.481689; sum 11.121923
    s, t = ce_for_ratios([1.2, 1.5, 1.2])
    np.testing.assert_allclose(factor.initial_factor(s, t), [0.298520, 0.402960, 0.298520], atol=1e-6)


def test_eq2_with_alpha_half():
    # r = [0.5, 0.5], ratios [1, 2]: psi ~ [0.5e, 0.5e^2] -> normalised [0.268941, 0.731059]
    # r' = 0.5 * that + 0.25 = [0.384471, 0.615529]
    s, t = ce_for_ratios([1.0, 2.0])
    np.testing.assert_allclose(
        factor.smoothed_update([0.5, 0.5], s, t, alpha=0.5),
        [0.38447071068499755, 0.6155292893150024],
        rtol=1e-12,
    )


def test_eq2_history_matters():
    # r = [0.8, 0.2], ratios [1, 2]: psi = [0.8e, 0.2e^2] = [2.174625, 1.477811] -> [0.595390, 0.404610]
    # r' = 0.5 * that + 0.25 = [0.547695, 0.452305]
    s, t = ce_for_ratios([1.0, 2.0])
    np.testing.assert_allclose(
        factor.smoothed_update([0.8, 0.2], s, t, alpha=0.5), [0.547695, 0.452305], atol=1e-6
    )


def test_eq2_at_alpha_half_keeps_eq1s_mixture_to_first_order():
    """Why the paper's "w/o FS" ablation ties DDK near the teacher (docs/DDK.md). Write r_t = (1 + c_t d) / N with
    d = g - mean(g), g the ratios: to first order in d, Eq. 2 gives c_{t+1} = alpha * (c_t + 1), and Eq. 1 is
    c = 1. At alpha = 0.5 Eq. 2 keeps c = 1 window after window, so with and without smoothing pick the same
    mixture up to O(d^2); at alpha = 0.8 c grows to alpha / (1 - alpha) = 4."""
    tv = factor.total_variation
    s, t = ce_for_ratios([1.51, 1.60, 2.19, 2.10])  # the near regime's first evaluation
    eq1 = factor.initial_factor(s, t)
    r = eq1
    for _ in range(8):  # ratios held fixed: Eq. 2's own drift
        r = factor.smoothed_update(r, s, t, alpha=0.5)
        assert tv(r, eq1) < 0.02
    assert tv(eq1, [0.25] * 4) > 0.1  # while both are far from uniform
    s, t = ce_for_ratios([1.50, 1.51, 1.52, 1.53])
    eq1, r = factor.initial_factor(s, t), factor.initial_factor(s, t)
    for _ in range(40):
        r = factor.smoothed_update(r, s, t, alpha=0.8)
    np.testing.assert_allclose(r - 0.25, 4 * (eq1 - 0.25), rtol=0.1)


def test_eq2_alpha_one_and_zero():
    s, t = ce_for_ratios([1.0, 1.5, 3.0])
    prev = np.array([0.2, 0.3, 0.5])
    psi = prev * np.exp([1.0, 1.5, 3.0])
    np.testing.assert_allclose(factor.smoothed_update(prev, s, t, alpha=1.0), psi / psi.sum(), rtol=1e-12)
    np.testing.assert_allclose(factor.smoothed_update(prev, s, t, alpha=0.0), [1 / 3] * 3, rtol=1e-12)


def test_one_domain_has_all_the_weight():
    assert factor.initial_factor([5.0], [2.0]).tolist() == [1.0]
    assert factor.smoothed_update([1.0], [5.0], [2.0], alpha=0.5).tolist() == [1.0]


@pytest.mark.parametrize("ce_gap", [math.log(1e6), 1000.0])
def test_huge_ratio_neither_overflows_nor_starves_a_domain(ce_gap):
    # a ratio of 1e6 (or e^1000) is exponentiated again by Eq. 1: overflows float64 if done literally
    s, t = [1.0 + ce_gap, 1.0, 1.0], [1.0, 1.0, 1.0]
    w = factor.initial_factor(s, t)
    assert np.all(np.isfinite(w)) and w.sum() == pytest.approx(1.0, abs=1e-12)
    assert w[0] > 0.99 and w[1:] == pytest.approx([factor.MIN_WEIGHT] * 2, rel=1e-9)
    w2 = factor.smoothed_update(w, s, t, alpha=1.0)
    assert np.all(np.isfinite(w2)) and np.all(w2 >= factor.MIN_WEIGHT * (1 - 1e-9))
    for _ in range(20):  # repeated alpha=1 updates: the floor keeps the lagging-free domains alive
        w2 = factor.smoothed_update(w2, s, t, alpha=1.0)
    assert np.all(w2 >= factor.MIN_WEIGHT * (1 - 1e-9)) and w2.sum() == pytest.approx(1.0)


def test_apply_floor_mixes_with_uniform_exactly():
    w = factor.apply_floor([0.9, 0.1, 0.0], floor=0.01)
    # lam = 0.01 / (1/3) = 0.03: [0.9*0.97 + 0.01, 0.1*0.97 + 0.01, 0.01]
    np.testing.assert_allclose(w, [0.883, 0.107, 0.01], atol=1e-12)
    np.testing.assert_allclose(factor.apply_floor([0.5, 0.5, 0.0], floor=0.5), [1 / 3] * 3)
    assert factor.apply_floor([0.6, 0.4]).tolist() == [0.6, 0.4]


def test_weaker_domain_gains_weight():
    s, t = [2.0, 2.0, 4.0], [2.0, 2.0, 2.0]  # the student lags on domain 2 only
    r0 = np.full(3, 1 / 3)
    r1 = factor.smoothed_update(r0, s, t, alpha=0.5)
    assert r1[2] > r0[2] and r1[0] < r0[0] and r1[0] == pytest.approx(r1[1])
    r2 = factor.smoothed_update(r1, s, t, alpha=0.5)
    assert r2[2] > r1[2]  # the history term keeps pushing while the gap persists
    assert r2.max() <= 0.5 + 0.5 / 3  # but alpha = 0.5 bounds a weight by alpha + (1 - alpha) / N


def test_modes():
    s, t = ce_for_ratios([1.0, 2.0])
    static = [3.0, 1.0]
    kw = dict(ce_student=s, ce_teacher=t, alpha=0.5, static_weights=static)
    assert factor.next_weights("equal", r_prev=None, **kw).tolist() == [0.5, 0.5]
    assert factor.next_weights("static", r_prev=[0.5, 0.5], **kw).tolist() == [0.75, 0.25]
    eq1 = factor.initial_factor(s, t)
    np.testing.assert_allclose(factor.next_weights("no-smoothing", r_prev=[0.9, 0.1], **kw), eq1)
    np.testing.assert_allclose(factor.next_weights("ddk", r_prev=None, **kw), eq1)
    np.testing.assert_allclose(
        factor.next_weights("ddk", r_prev=[0.5, 0.5], **kw), [0.384470711, 0.615529289]
    )
    assert factor.first_weights("equal", static, 2).tolist() == [0.5, 0.5]
    assert factor.first_weights("ddk", static, 2).tolist() == [0.75, 0.25]
    assert factor.first_weights("no-smoothing", static, 2).tolist() == [0.75, 0.25]
    assert factor.first_weights("static", static, 2).tolist() == [0.75, 0.25]
    assert factor.MIXING_MODES[:4] == ("ddk", "no-smoothing", "equal", "static")


@pytest.mark.parametrize(
    "call,needle",
    [
        (lambda: factor.smoothed_update([0.5, 0.5], [1, 1], [1, 1], alpha=1.5), "--ddk-alpha"),
        (
            lambda: factor.next_weights(
                "equal", r_prev=None, ce_student=[1], ce_teacher=[1], alpha=-0.1, static_weights=[1]
            ),
            "--ddk-alpha",
        ),
        (lambda: factor.initial_factor([1, 2], [1]), "domains"),
        (lambda: factor.smoothed_update([1.0], [1, 2], [1, 2], alpha=0.5), "r_prev has 1 domains"),
        (lambda: factor.smoothed_update([1.0, 0.0], [1, 2], [1, 2], alpha=0.5), "positive"),
        (lambda: factor.initial_factor([float("nan")], [1]), "finite"),
        (lambda: factor.initial_factor([], []), "non-empty"),
        (
            lambda: factor.next_weights(
                "greedy", r_prev=None, ce_student=[1], ce_teacher=[1], alpha=0.5, static_weights=[1]
            ),
            "--ddk-mixing",
        ),
        (lambda: factor.first_weights("static", [1.0, -1.0], 2), "positive"),
        (lambda: factor.first_weights("ddk", [1.0], 2), "2 positive numbers"),
        (
            lambda: factor.next_weights(
                "ddk-log",
                r_prev=None,
                ce_student=[1],
                ce_teacher=[1],
                alpha=0.5,
                static_weights=[1],
                temperature=0.0,
            ),
            "--ddk-temperature",
        ),
        (
            lambda: factor.next_weights(
                "ddk-tempered",
                r_prev=None,
                ce_student=[1],
                ce_teacher=[1],
                alpha=0.5,
                static_weights=[1],
                temperature=-1.0,
            ),
            "--ddk-temperature",
        ),
        (lambda: factor.bounded_step([0.5, 0.5], [0.1, 0.9], 0.0), "--ddk-max-step"),
    ],
)
def test_bad_input(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()


# ------------------------------------------------------------------ the ddk-* modes (beyond the paper)
def weights(mode, ratios, r_prev=None, **kw):
    s, t = ce_for_ratios(ratios)
    return factor.next_weights(
        mode,
        r_prev=r_prev,
        ce_student=s,
        ce_teacher=t,
        alpha=kw.pop("alpha", 0.5),
        static_weights=kw.pop("static", [1.0] * len(ratios)),
        **kw,
    )


def test_smooth0_mixes_window_0_with_uniform():
    # Eq. 1 on ratios [1, 2] = [0.268941, 0.731059]; 0.5 * that + 0.25 = [0.384471, 0.615529]
    np.testing.assert_allclose(
        weights("ddk-smooth0", [1.0, 2.0]), [0.38447071068499755, 0.6155292893150024], rtol=1e-12
    )
    # later windows: Eq. 2 unchanged
    np.testing.assert_allclose(
        weights("ddk-smooth0", [1.0, 2.0], r_prev=[0.5, 0.5]), [0.384471, 0.615529], atol=1e-6
    )


def test_tempered_divides_the_ratios():
    # tau = 2: softmax([0.5, 1.0]) = [1, e^0.5] / (1 + e^0.5) = [0.377541, 0.622459]
    np.testing.assert_allclose(
        weights("ddk-tempered", [1.0, 2.0], temperature=2.0), [0.377541, 0.622459], atol=1e-6
    )
    np.testing.assert_allclose(
        weights("ddk-tempered", [1.0, 2.0]), factor.initial_factor(*ce_for_ratios([1, 2]))
    )


def test_log_space_weights_are_proportional_to_the_ratio():
    # g = log ratio: softmax(log [1, 2]) = [1/3, 2/3]; tau = 2: ~ sqrt(ratio) = [1, 1.414214] / 2.414214
    np.testing.assert_allclose(weights("ddk-log", [1.0, 2.0]), [1 / 3, 2 / 3], rtol=1e-12)
    np.testing.assert_allclose(
        weights("ddk-log", [1.0, 2.0], temperature=2.0), [0.414214, 0.585786], atol=1e-6
    )
    # Eq. 2 in log space: psi = r_t * ratio = [0.5, 1.0] -> [1/3, 2/3]; 0.5 * that + 0.25
    np.testing.assert_allclose(
        weights("ddk-log", [1.0, 2.0], r_prev=[0.5, 0.5]), [5 / 12, 7 / 12], rtol=1e-12
    )
    # from r = [0.8, 0.2]: psi = [0.8, 0.4] -> [2/3, 1/3] -> [0.583333, 0.416667]
    np.testing.assert_allclose(
        weights("ddk-log", [1.0, 2.0], r_prev=[0.8, 0.2]), [7 / 12, 5 / 12], rtol=1e-12
    )


def test_robust_on_the_issue_ratios():
    # issue #16's iteration-0 ratios: the paper's Eq. 1 puts 99.6% on one domain
    ratios = [2.1, 4.9, 2.8, 10.6]
    paper = weights("ddk", ratios)
    assert paper[3] > 0.995 and paper[1] == pytest.approx(0.004, abs=1e-3)
    # log space: ratio / sum = [2.1, 4.9, 2.8, 10.6] / 20.4; robust adds Eq. 2's uniform term: 0.5 w + 0.125
    proportional = np.array(ratios) / 20.4
    np.testing.assert_allclose(weights("ddk-log", ratios), proportional, rtol=1e-12)
    np.testing.assert_allclose(weights("ddk-robust", ratios), 0.5 * proportional + 0.125, rtol=1e-12)
    np.testing.assert_allclose(
        weights("ddk-robust", ratios), [0.176471, 0.245098, 0.193627, 0.384804], atol=1e-6
    )
    # its updates are ddk-log's
    prev = [0.1, 0.2, 0.3, 0.4]
    np.testing.assert_allclose(
        weights("ddk-robust", ratios, r_prev=prev), weights("ddk-log", ratios, r_prev=prev)
    )


def test_bounded_moves_at_most_max_step():
    # window 0 starts from the registry's weights [0.5, 0.5]; Eq. 1 wants [0.268941, 0.731059] (TV 0.231059);
    # a step of 0.1 goes 0.1 / 0.231059 of the way: [0.4, 0.6]
    np.testing.assert_allclose(weights("ddk-bounded", [1.0, 2.0], max_step=0.1), [0.4, 0.6], rtol=1e-12)
    np.testing.assert_allclose(
        weights("ddk-bounded", [1.0, 2.0], static=[3.0, 1.0], max_step=0.1), [0.65, 0.35], rtol=1e-12
    )
    # a step larger than the distance reaches the paper's weights
    np.testing.assert_allclose(weights("ddk-bounded", [1.0, 2.0], max_step=0.5), weights("ddk", [1.0, 2.0]))
    # an update: Eq. 2 from [0.5, 0.5] wants [0.384471, 0.615529] (TV 0.115529); a step of 0.05: [0.45, 0.55]
    np.testing.assert_allclose(
        weights("ddk-bounded", [1.0, 2.0], r_prev=[0.5, 0.5], max_step=0.05), [0.45, 0.55], rtol=1e-12
    )
    assert factor.total_variation([0.5, 0.5], [0.45, 0.55]) == pytest.approx(0.05)
