"""What a run can draw: exact for static mixtures, a true upper bound for DDK's dynamic one."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_ddk.data.coverage import RunDraws, first_samples, samples_a_run_can_draw
from megatron_ddk.data.mixing import DomainMixingSchedule
from megatron_ddk.ddk.factor import initial_factor, smoothed_update

SIZES = [50, 30, 7]
STATIC = [0.5, 0.3, 0.2]


def drawn(schedule, total):
    domains, samples = schedule.lookup(0, total)
    return [np.unique(samples[domains == d]) for d in range(len(SIZES))]


@pytest.mark.parametrize("mode,mixing", [("kd", "ddk"), ("cpt", "ddk"), ("ddk", "static"), ("ddk", "equal")])
def test_static_mixtures_are_exact(mode, mixing):
    run = RunDraws(train_iters=7, global_batch_size=4, interval=3, seed=5, mode=mode, mixing=mixing)
    samples, exact = samples_a_run_can_draw(SIZES, STATIC, run)
    weights = np.full(3, 1 / 3) if (mode, mixing) == ("ddk", "equal") else STATIC
    schedule = DomainMixingSchedule(SIZES, window_size=12, seed=5, initial_weights=weights)
    assert exact
    for mine, theirs in zip(samples, drawn(schedule, 28)):
        np.testing.assert_array_equal(mine, theirs)


@pytest.mark.parametrize("mixing", ["ddk", "no-smoothing"])
def test_ddk_bound_covers_every_trajectory(mixing):
    run = RunDraws(
        train_iters=9, global_batch_size=4, interval=2, seed=5, mode="ddk", mixing=mixing, alpha=0.5
    )
    samples, exact = samples_a_run_can_draw(SIZES, STATIC, run)
    assert not exact
    rng = np.random.default_rng(0)
    for _ in range(20):
        ce_teacher = rng.uniform(1, 3, 3)
        r = initial_factor(ce_teacher + rng.uniform(0, 6, 3), ce_teacher)
        schedule = DomainMixingSchedule(SIZES, window_size=8, seed=5, initial_weights=r)
        for window in range(1, 5):
            ce_student = ce_teacher + rng.uniform(0, 6, 3)
            r = (
                initial_factor(ce_student, ce_teacher)
                if mixing == "no-smoothing"
                else smoothed_update(r, ce_student, ce_teacher, alpha=0.5)
            )
            schedule.set_window_weights(window, r)
        for bound, used in zip(samples, drawn(schedule, 36)):
            assert np.isin(used, bound).all()
    assert sum(len(s) for s in samples) < sum(SIZES) or mixing == "no-smoothing"


def test_first_samples_follow_the_sampler_order():
    schedule = DomainMixingSchedule(SIZES, window_size=10, seed=9, initial_weights=[1.0, 0.0001, 0.0001])
    domains, samples = schedule.lookup(0, 10)
    count = int((domains == 0).sum())
    np.testing.assert_array_equal(first_samples(SIZES, 9, count)[0], np.sort(samples[domains == 0]))
    assert len(first_samples(SIZES, 9, 10)[2]) == 7  # capped by the domain's size
