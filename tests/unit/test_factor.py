"""Eq. 1 and Eq. 2 against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_ddk.ddk import factor


def ce_for_ratios(ratios):
    """CEs whose perplexity ratios are ``ratios`` (teacher CE 1.0 everywhere)."""
    return [1.0 + math.log(r) for r in ratios], [1.0] * len(ratios)


def test_ratio_is_perplexity_quotient():
    np.testing.assert_allclose(factor.perplexity_ratio([2.0, 1.0], [1.0, 1.0]), [math.e, 1.0])


def test_eq1_softmax_of_ratios():
    # ratios 1 and 2: softmax = [e^1, e^2] / (e^1 + e^2) = [0.268941..., 0.731058...]
    s, t = ce_for_ratios([1.0, 2.0])
    np.testing.assert_allclose(factor.initial_factor(s, t), [0.2689414213699951, 0.7310585786300049], rtol=1e-12)


def test_eq2_with_alpha_half():
    # r = [0.5, 0.5], ratios [1, 2]: psi ~ [0.5e, 0.5e^2] -> normalised [0.268941, 0.731059]
    # r' = 0.5 * that + 0.25 = [0.384471, 0.615529]
    s, t = ce_for_ratios([1.0, 2.0])
    np.testing.assert_allclose(factor.smoothed_update([0.5, 0.5], s, t, alpha=0.5),
                               [0.38447071068499755, 0.6155292893150024], rtol=1e-12)


def test_eq2_alpha_one_and_zero():
    s, t = ce_for_ratios([1.0, 1.5, 3.0])
    prev = np.array([0.2, 0.3, 0.5])
    psi = prev * np.exp([1.0, 1.5, 3.0])
    np.testing.assert_allclose(factor.smoothed_update(prev, s, t, alpha=1.0), psi / psi.sum(), rtol=1e-12)
    np.testing.assert_allclose(factor.smoothed_update(prev, s, t, alpha=0.0), [1 / 3] * 3, rtol=1e-12)


def test_one_domain_has_all_the_weight():
    assert factor.initial_factor([5.0], [2.0]).tolist() == [1.0]
    assert factor.smoothed_update([1.0], [5.0], [2.0], alpha=0.5).tolist() == [1.0]


def test_huge_ratio_neither_overflows_nor_starves_a_domain():
    # student CE 1000 nats above the teacher: ratio e^1000 overflows float64 if done literally
    w = factor.initial_factor([1001.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    assert np.all(np.isfinite(w)) and abs(w.sum() - 1) < 1e-12
    assert w[0] > 0.99 and np.all(w >= factor.MIN_WEIGHT * (1 - 1e-9))
    w2 = factor.smoothed_update(w, [1001.0, 1.0, 1.0], [1.0, 1.0, 1.0], alpha=1.0)
    assert np.all(np.isfinite(w2)) and np.all(w2 >= factor.MIN_WEIGHT * (1 - 1e-9))


def test_weaker_domain_gains_weight():
    s, t = [2.0, 2.0, 4.0], [2.0, 2.0, 2.0]  # the student lags on domain 2 only
    r0 = np.full(3, 1 / 3)
    r1 = factor.smoothed_update(r0, s, t, alpha=0.5)
    assert r1[2] > r0[2] and r1[0] < r0[0] and r1[0] == pytest.approx(r1[1])


def test_modes():
    s, t = ce_for_ratios([1.0, 2.0])
    static = [3.0, 1.0]
    assert factor.next_weights("equal", r_prev=None, ce_student=s, ce_teacher=t, alpha=0.5,
                               static_weights=static).tolist() == [0.5, 0.5]
    assert factor.next_weights("static", r_prev=[0.5, 0.5], ce_student=s, ce_teacher=t, alpha=0.5,
                               static_weights=static).tolist() == [0.75, 0.25]
    eq1 = factor.initial_factor(s, t)
    np.testing.assert_allclose(factor.next_weights("no-smoothing", r_prev=[0.9, 0.1], ce_student=s, ce_teacher=t,
                                                   alpha=0.5, static_weights=static), eq1)
    np.testing.assert_allclose(factor.next_weights("ddk", r_prev=None, ce_student=s, ce_teacher=t, alpha=0.5,
                                                   static_weights=static), eq1)
    assert factor.first_weights("equal", static, 2).tolist() == [0.5, 0.5]
    assert factor.first_weights("ddk", static, 2).tolist() == [0.75, 0.25]


@pytest.mark.parametrize("call,needle", [
    (lambda: factor.smoothed_update([0.5, 0.5], [1, 1], [1, 1], alpha=1.5), "--ddk-alpha"),
    (lambda: factor.initial_factor([1, 2], [1]), "domains"),
    (lambda: factor.initial_factor([float("nan")], [1]), "finite"),
    (lambda: factor.next_weights("greedy", r_prev=None, ce_student=[1], ce_teacher=[1], alpha=0.5,
                                 static_weights=[1]), "--ddk-mixing"),
])
def test_bad_input(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()
