"""The mixing sampler: exact per-window layouts, continuing offsets, epochs, determinism, resume, DP slices."""

from __future__ import annotations

import json

import numpy as np
import pytest
from megatron.core.datasets import helpers_cpp

from megatron_ddk.data.mixing import DomainMixingSchedule, dp_micro_batch_indices

SIZES = [50, 30, 7]


def helper_layout(weights, size):
    """What build_blending_indices gives for one window: domain order [size] and counts [N]."""
    d = np.zeros(size, dtype=np.int16)
    s = np.zeros(size, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    helpers_cpp.build_blending_indices(d, s, w / w.sum(), len(w), size, False)
    return d, np.bincount(d, minlength=len(w))


def make(window=20, seed=3, weights=(0.5, 0.3, 0.2)):
    return DomainMixingSchedule(SIZES, window_size=window, seed=seed, initial_weights=weights)


def test_each_window_follows_the_helper_layout_and_offsets_continue():
    sched = make()
    windows = [(0.5, 0.3, 0.2), (0.1, 0.1, 0.8), (1.0, 1.0, 1.0)]
    for j, weights in enumerate(windows):
        if j:
            sched.set_window_weights(j, weights)
        domains, _ = sched.lookup(j * 20, (j + 1) * 20)
        expected_order, expected_counts = helper_layout(weights, 20)
        np.testing.assert_array_equal(domains, expected_order)
        np.testing.assert_array_equal(sched.window_counts(j), expected_counts)
    assert sched.window_counts(0).tolist() == [10, 6, 4]  # 0.5/0.3/0.2 of 20, exactly
    offsets = [sched.offsets_at_window(j) for j in range(4)]
    assert offsets[0].tolist() == [0, 0, 0]
    for j in range(3):
        np.testing.assert_array_equal(offsets[j + 1] - offsets[j], sched.window_counts(j))
    np.testing.assert_allclose(sched.weight_history, [windows[0], windows[1], [1 / 3] * 3])


def test_sample_ids_follow_the_per_domain_permutation_across_windows():
    sched = make()
    sched.set_window_weights(1, (0.1, 0.1, 0.8))
    domains, samples = sched.lookup(0, 40)
    for d, size in enumerate(SIZES):
        drawn = samples[domains == d]  # the k-th draw ever from d, in order, over both windows
        k = np.arange(drawn.size)
        expected = [
            np.random.default_rng([3, d, int(e)]).permutation(size)[i] for e, i in zip(k // size, k % size)
        ]
        assert drawn.tolist() == expected


def test_small_domain_wraps_into_a_new_shuffled_epoch_without_repeats():
    sched = make(window=100, weights=(0.01, 0.01, 0.98))
    domains, samples = sched.lookup(0, 100)
    small = samples[domains == 2]
    assert len(small) > 2 * SIZES[2]
    epochs = [small[i : i + SIZES[2]] for i in range(0, len(small) - SIZES[2] + 1, SIZES[2])]
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(SIZES[2]))  # every sample once per epoch
    assert any(not np.array_equal(epochs[0], e) for e in epochs[1:])  # reshuffled


def test_no_sample_skipped_across_windows():
    sched = make(window=10, weights=(1, 1, 1))
    domains, samples = sched.lookup(0, 90)  # 9 windows
    for d, size in enumerate(SIZES):
        drawn = samples[domains == d][:size]
        assert len(set(drawn.tolist())) == len(drawn)
        if len(drawn) == size:
            assert sorted(drawn.tolist()) == list(range(size))


def test_lookup_across_a_window_boundary_equals_piecewise_lookups():
    a, b = make(window=16), make(window=16)
    whole = a.lookup(10, 40)
    parts = [b.lookup(10, 16), b.lookup(16, 32), b.lookup(32, 40)]
    np.testing.assert_array_equal(whole[0], np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(whole[1], np.concatenate([p[1] for p in parts]))
    np.testing.assert_array_equal(a.lookup(0, 5)[1], make(window=16).lookup(0, 5)[1])  # old window re-read


def test_deterministic_and_seed_dependent():
    a, b, c = make(), make(), make(seed=4)
    np.testing.assert_array_equal(a.lookup(0, 60)[1], b.lookup(0, 60)[1])
    assert not np.array_equal(a.lookup(0, 60)[1], c.lookup(0, 60)[1])


def test_unset_windows_inherit_the_last_weights():
    sched = make()
    sched.set_window_weights(1, (0.1, 0.1, 0.8))
    sched.lookup(0, 80)  # windows 0..3
    assert sched.num_windows_laid_out == 4
    np.testing.assert_allclose(sched.weight_history[2:], [[0.1, 0.1, 0.8]] * 2)
    sched.set_window_weights(6, (1, 1, 2))  # skipping 4 and 5: they inherit window 3's weights
    assert sched.weights_for_window(5).tolist() == pytest.approx([0.1, 0.1, 0.8])
    assert sched.weights_for_window(9).tolist() == pytest.approx([0.25, 0.25, 0.5])


def test_state_dict_round_trip_mid_stream():
    full = make()
    full.set_window_weights(1, (0.1, 0.1, 0.8))
    full.set_window_weights(3, (0.6, 0.2, 0.2))
    reference = full.lookup(0, 100)
    part = make()
    part.lookup(0, 15)  # mid-window 0
    part.set_window_weights(1, (0.1, 0.1, 0.8))
    part.lookup(15, 45)  # mid-window 2
    state = json.loads(json.dumps(part.state_dict()))  # plain JSON
    assert state["weights"][1] == pytest.approx([0.1, 0.1, 0.8]) and state["windows_laid_out"] == 3
    resumed = make()
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="already laid out"):
        resumed.set_window_weights(2, (1, 1, 1))  # window 2 was read before the save
    resumed.set_window_weights(3, (0.6, 0.2, 0.2))
    got = resumed.lookup(45, 100)
    np.testing.assert_array_equal(got[0], reference[0][45:])
    np.testing.assert_array_equal(got[1], reference[1][45:])
    np.testing.assert_array_equal(resumed.offsets_at_window(3), full.offsets_at_window(3))


def test_weights_of_a_read_window_are_frozen():
    sched = make()
    sched.lookup(0, 5)
    with pytest.raises(ValueError, match="already laid out"):
        sched.set_window_weights(0, (1, 1, 1))
    sched.set_window_weights(1, (1, 1, 1))  # window 1 not read yet: fine
    with pytest.raises(ValueError, match="positive"):
        sched.set_window_weights(2, (1, 0, 1))


def test_resume_with_other_settings_is_refused():
    with pytest.raises(ValueError, match="--ddk-interval"):
        make(window=40).load_state_dict(make().state_dict())
    with pytest.raises(ValueError, match="lacks windows_laid_out"):
        state = make().state_dict()
        del state["windows_laid_out"]
        make().load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(domain_sizes=[5, 0]), "at least one training sample"),
        (dict(window_size=0), "must be > 0"),
        (dict(seed=-1), "--seed"),
        (dict(initial_weights=(1, 1)), "3 positive finite"),
    ],
)
def test_bad_construction(kwargs, needle):
    args = dict(domain_sizes=SIZES, window_size=10, seed=0, initial_weights=(1, 1, 1)) | kwargs
    sizes = args.pop("domain_sizes")
    with pytest.raises(ValueError, match=needle):
        DomainMixingSchedule(sizes, **args)


def test_large_window_is_cheap():
    sched = DomainMixingSchedule(
        [10_000, 300_000, 70], window_size=1_000_000, seed=0, initial_weights=(1, 2, 3)
    )
    np.testing.assert_array_equal(sched.window_counts(0), helper_layout((1, 2, 3), 1_000_000)[1])
    domains, samples = sched.lookup(999_000, 1_001_000)  # straddles windows 0 and 1
    assert domains.size == 2000 and samples.max() < 300_000


def test_dp_slices_are_disjoint_and_cover_the_global_batch():
    ranks = [
        dp_micro_batch_indices(3, global_batch_size=16, micro_batch_size=2, dp_rank=r, dp_size=2)
        for r in range(2)
    ]
    assert [len(r) for r in ranks] == [4, 4]
    assert ranks[0] == [range(48, 50), range(52, 54), range(56, 58), range(60, 62)]
    assert ranks[1] == [range(50, 52), range(54, 56), range(58, 60), range(62, 64)]
    # interleaved micro-batch by micro-batch, the two ranks give back the global batch in order
    merged = [i for pair in zip(*ranks) for mb in pair for i in mb]
    assert merged == list(range(48, 64))
    with pytest.raises(ValueError, match="--global-batch-size 10"):
        dp_micro_batch_indices(0, global_batch_size=10, micro_batch_size=2, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match="rank 2 of 2"):
        dp_micro_batch_indices(0, global_batch_size=8, micro_batch_size=2, dp_rank=2, dp_size=2)
