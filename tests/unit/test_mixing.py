"""The mixing sampler: exact per-window layouts, continuing offsets, epochs, determinism, resume, DP slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from megatron.core.datasets import helpers_cpp

from megatron_ddk.data.loader import MixedDomainBatches, evaluation_batches
from megatron_ddk.data.mixing import DomainMixingSchedule, dp_micro_batch_indices

SIZES = [50, 30, 7]


def helper_counts(weights, size):
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
        expected_order, expected_counts = helper_counts(weights, 20)
        np.testing.assert_array_equal(domains, expected_order)
        np.testing.assert_array_equal(sched.window_counts(j), expected_counts)
    offsets = [sched.offsets_at_window(j) for j in range(4)]
    for j in range(3):
        np.testing.assert_array_equal(offsets[j + 1] - offsets[j], sched.window_counts(j))


def test_small_domain_wraps_into_a_new_shuffled_epoch_without_repeats():
    sched = make(window=100, weights=(0.01, 0.01, 0.98))
    domains, samples = sched.lookup(0, 100)
    small = samples[domains == 2]
    assert len(small) > 2 * SIZES[2]
    epochs = [small[i: i + SIZES[2]] for i in range(0, len(small) - SIZES[2] + 1, SIZES[2])]
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(SIZES[2]))  # every sample once per epoch
    assert any(not np.array_equal(epochs[0], e) for e in epochs[1:])  # reshuffled


def test_no_sample_skipped_across_windows():
    sched = make(window=10, weights=(1, 1, 1))
    domains, samples = sched.lookup(0, 90)
    for d, size in enumerate(SIZES):
        drawn = samples[domains == d][: size]
        if len(drawn) == size:
            assert sorted(drawn.tolist()) == list(range(size))
        else:
            assert len(set(drawn.tolist())) == len(drawn)


def test_deterministic_and_seed_dependent():
    a, b, c = make(), make(), make(seed=4)
    np.testing.assert_array_equal(a.lookup(0, 60)[1], b.lookup(0, 60)[1])
    assert not np.array_equal(a.lookup(0, 60)[1], c.lookup(0, 60)[1])


def test_state_dict_round_trip_mid_stream():
    full = make()
    full.set_window_weights(1, (0.1, 0.1, 0.8))
    reference = full.lookup(0, 100)
    part = make()
    part.lookup(0, 15)  # mid-window 0
    part.set_window_weights(1, (0.1, 0.1, 0.8))
    state = part.state_dict()
    assert state["weights"][1] == pytest.approx([0.1, 0.1, 0.8])
    resumed = make()
    resumed.load_state_dict(state)
    got = resumed.lookup(15, 100)
    np.testing.assert_array_equal(got[0], reference[0][15:])
    np.testing.assert_array_equal(got[1], reference[1][15:])


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


def test_dp_slices_are_disjoint_and_cover_the_global_batch():
    ranks = [dp_micro_batch_indices(3, global_batch_size=16, micro_batch_size=2, dp_rank=r, dp_size=2) for r in range(2)]
    assert [len(r) for r in ranks] == [4, 4]
    flat = sorted(i for rank in ranks for mb in rank for i in mb)
    assert flat == list(range(48, 64))
    assert ranks[0][0] == range(48, 50) and ranks[1][0] == range(50, 52)
    with pytest.raises(ValueError, match="--global-batch-size 10"):
        dp_micro_batch_indices(0, global_batch_size=10, micro_batch_size=2, dp_rank=0, dp_size=2)


class FakeDomain(torch.utils.data.Dataset):
    def __init__(self, domain, size, seq=4):
        self.domain, self.size, self.seq = domain, size, seq

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        tokens = torch.full((self.seq,), 1000 * self.domain + i)
        return {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(self.seq), "position_ids": torch.arange(self.seq)}


def test_loader_batches_carry_domain_and_sample_ids_and_dp_ranks_split_the_stream():
    data = [FakeDomain(d, s) for d, s in enumerate(SIZES)]
    rank_batches = []
    for rank in range(2):
        loader = MixedDomainBatches(data, make(window=16), global_batch_size=8, micro_batch_size=2, dp_rank=rank,
                                    dp_size=2, start_iteration=0)
        rank_batches.append([next(loader) for _ in range(4)])  # 2 iterations x 2 micro-batches
    positions = sorted(int(p) for batches in rank_batches for b in batches for p in b["global_position"])
    assert positions == list(range(16))
    reference = make(window=16).lookup(0, 16)
    for batches in rank_batches:
        for b in batches:
            pos = b["global_position"].numpy()
            np.testing.assert_array_equal(b["domain_id"].numpy(), reference[0][pos])
            np.testing.assert_array_equal(b["tokens"][:, 0].numpy(), 1000 * reference[0][pos] + reference[1][pos])


def test_loader_resumes_at_an_iteration():
    data = [FakeDomain(d, s) for d, s in enumerate(SIZES)]
    a = MixedDomainBatches(data, make(), global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1)
    seen = [next(a) for _ in range(6)]
    b = MixedDomainBatches(data, make(), global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1,
                           start_iteration=2)
    assert torch.equal(next(b)["tokens"], seen[4]["tokens"])


def test_evaluation_batches_split_without_overlap_and_pad_with_zero_mask():
    data = FakeDomain(0, 11)
    per_rank = [evaluation_batches(data, num_samples=9, micro_batch_size=2, dp_rank=r, dp_size=2) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 3
    counted = sorted(int(b["tokens"][i, 0]) for batches in per_rank for b in batches for i in range(2)
                     if b["loss_mask"][i].sum() > 0)
    assert counted == list(range(9))
