"""Training micro-batches from the mixing schedule, and per-domain validation batches split over DP ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_ddk.data.loader import MixedDomainBatches, evaluation_batches
from megatron_ddk.data.mixing import DomainMixingSchedule

SIZES = [50, 30, 7]
SEQ = 4


class FakeDomain(torch.utils.data.Dataset):
    """GPTDataset-like samples whose first token encodes (domain, sample id)."""

    def __init__(self, domain, size):
        self.domain, self.size = domain, size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        if not 0 <= i < self.size:
            raise IndexError(i)
        tokens = torch.full((SEQ,), 1000 * self.domain + i)
        return {
            "tokens": tokens,
            "labels": tokens + 1,
            "loss_mask": torch.ones(SEQ),
            "position_ids": torch.arange(SEQ),
        }


def count_evaluation_samples(batches) -> int:
    """Real (unpadded) samples in ``batches``: summed over DP ranks it equals min(num_samples, len)."""
    return int(sum(int((batch["sample_id"] >= 0).sum()) for batch in batches))


def domains():
    return [FakeDomain(d, s) for d, s in enumerate(SIZES)]


def schedule(window=16):
    return DomainMixingSchedule(SIZES, window_size=window, seed=3, initial_weights=(0.5, 0.3, 0.2))


def loader(sched, rank=0, dp=1, gbs=8, mbs=2, start=0):
    return MixedDomainBatches(
        domains(),
        sched,
        global_batch_size=gbs,
        micro_batch_size=mbs,
        dp_rank=rank,
        dp_size=dp,
        start_iteration=start,
    )


def test_batches_carry_domain_and_sample_ids_and_dp_ranks_split_the_stream():
    rank_batches = []
    for rank in range(2):
        batches = loader(schedule(), rank=rank, dp=2)
        assert batches.num_microbatches == 2
        rank_batches.append([next(batches) for _ in range(4)])  # 2 iterations x 2 micro-batches
        assert batches.iteration == 2
    positions = sorted(int(p) for batches in rank_batches for b in batches for p in b["global_position"])
    assert positions == list(range(16))
    assert rank_batches[0][0]["global_position"].tolist() == [0, 1]
    assert rank_batches[1][0]["global_position"].tolist() == [2, 3]
    ref_domains, ref_samples = schedule().lookup(0, 16)
    for batches in rank_batches:
        for b in batches:
            assert b["tokens"].shape == b["labels"].shape == b["loss_mask"].shape == (2, SEQ)
            assert b["domain_id"].dtype == b["sample_id"].dtype == torch.long
            pos = b["global_position"].numpy()
            np.testing.assert_array_equal(b["domain_id"].numpy(), ref_domains[pos])
            np.testing.assert_array_equal(b["sample_id"].numpy(), ref_samples[pos])
            np.testing.assert_array_equal(
                b["tokens"][:, 0].numpy(), 1000 * ref_domains[pos] + ref_samples[pos]
            )


def test_weights_set_at_a_window_end_apply_to_the_next_window():
    # window = 2 iterations x GBS 8; after reading all of window 0, fix window 1 to (nearly) only domain 2
    sched = schedule(window=16)
    batches = loader(sched)
    for _ in range(8):  # 2 iterations x 4 micro-batches: exactly window 0
        next(batches)
    sched.set_window_weights(1, (1e-6, 1e-6, 1.0))
    window1 = [next(batches) for _ in range(8)]
    drawn = torch.cat([b["domain_id"] for b in window1])
    assert sched.window_counts(1).tolist() == [1, 0, 15]  # the helper's greedy layout gives domain 0 one slot
    assert int((drawn == 2).sum()) == 15


def test_resume_at_an_iteration():
    a = loader(schedule(), gbs=4)
    seen = [next(a) for _ in range(6)]
    b = loader(schedule(), gbs=4, start=2)
    assert torch.equal(next(b)["tokens"], seen[4]["tokens"])
    assert torch.equal(next(b)["tokens"], seen[5]["tokens"])


def test_bad_setup():
    with pytest.raises(ValueError, match="2 datasets for a schedule of 3"):
        MixedDomainBatches(
            domains()[:2], schedule(), global_batch_size=8, micro_batch_size=2, dp_rank=0, dp_size=1
        )
    with pytest.raises(ValueError, match="dataset sizes"):
        MixedDomainBatches(
            [FakeDomain(0, 5), *domains()[1:]],
            schedule(),
            global_batch_size=8,
            micro_batch_size=2,
            dp_rank=0,
            dp_size=1,
        )
    with pytest.raises(ValueError, match="--global-batch-size 6"):
        loader(schedule(), dp=2, gbs=6)


@pytest.mark.parametrize(
    "num_samples,size,mbs,dp", [(9, 11, 2, 2), (20, 11, 2, 2), (5, 11, 3, 1), (3, 11, 2, 3)]
)
def test_evaluation_batches_split_without_overlap_and_pad_with_zero_mask(num_samples, size, mbs, dp):
    data = FakeDomain(0, size)
    total = min(num_samples, size)
    per_rank = [
        evaluation_batches(data, num_samples=num_samples, micro_batch_size=mbs, dp_rank=r, dp_size=dp)
        for r in range(dp)
    ]
    steps = -(-total // (mbs * dp))
    assert [len(b) for b in per_rank] == [steps] * dp  # every rank runs the same number of micro-batches
    counted = []
    for batches in per_rank:
        for b in batches:
            assert b["tokens"].shape == (mbs, SEQ)
            for row in range(mbs):
                if b["loss_mask"][row].sum() > 0:
                    counted.append(int(b["tokens"][row, 0]))
                    assert int(b["sample_id"][row]) == int(b["tokens"][row, 0])
                else:
                    assert int(b["sample_id"][row]) == -1
    assert sorted(counted) == list(range(total))  # each sample exactly once over all ranks
    assert sum(count_evaluation_samples(b) for b in per_rank) == total
    masked_tokens = sum(float(b["loss_mask"].sum()) for batches in per_rank for b in batches)
    assert masked_tokens == total * SEQ


def test_evaluation_batches_bad_input():
    with pytest.raises(ValueError, match="--ddk-val-samples"):
        evaluation_batches(FakeDomain(0, 3), num_samples=0, micro_batch_size=1, dp_rank=0, dp_size=1)
    with pytest.raises(ValueError, match="rank 1 of 1"):
        evaluation_batches(FakeDomain(0, 3), num_samples=2, micro_batch_size=1, dp_rank=1, dp_size=1)
