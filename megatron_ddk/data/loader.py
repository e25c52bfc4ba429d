"""Micro-batches for the training loop and for per-domain validation.

Training batches come from the mixing schedule, read in the main process only: no DataLoader
workers and no prefetch, so the weights DDK fixes for window j+1 at the end of window j are the
ones its first sample is drawn with (a GPTDataset sample is a cheap memory-mapped slice).
Every sample keeps its domain id; the loss function uses it for per-domain losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_ddk.data.mixing import DomainMixingSchedule, dp_micro_batch_indices

_FIELDS = ("tokens", "labels", "loss_mask", "position_ids")


def collate(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack GPTDataset samples into ``[b, s]`` tensors."""
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in _FIELDS}


class MixedDomainBatches:
    """Iterator over this DP rank's micro-batches, iteration after iteration, from ``start_iteration``."""

    def __init__(self, datasets: Sequence, schedule: DomainMixingSchedule, *, global_batch_size: int,
                 micro_batch_size: int, dp_rank: int, dp_size: int, start_iteration: int = 0):
        if len(datasets) != schedule.num_domains:
            raise ValueError(f"{len(datasets)} datasets for a schedule of {schedule.num_domains} domains")
        self.datasets = list(datasets)
        self.schedule = schedule
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_microbatches = global_batch_size // (micro_batch_size * dp_size)
        dp_micro_batch_indices(0, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                               dp_rank=dp_rank, dp_size=dp_size)  # validates the sizes
        self._iteration = start_iteration
        self._pending: list[range] = []

    @property
    def iteration(self) -> int:
        """The iteration whose micro-batches come next (when none of the current one is pending)."""
        return self._iteration

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self._pending:
            self._pending = dp_micro_batch_indices(
                self._iteration, global_batch_size=self.global_batch_size, micro_batch_size=self.micro_batch_size,
                dp_rank=self.dp_rank, dp_size=self.dp_size)
            self._iteration += 1
        positions = self._pending.pop(0)
        domains, samples = self.schedule.lookup(positions.start, positions.stop)
        batch = collate([self.datasets[d][int(i)] for d, i in zip(domains, samples)])
        batch["domain_id"] = torch.as_tensor(domains, dtype=torch.long)
        batch["sample_id"] = torch.as_tensor(samples, dtype=torch.long)
        batch["global_position"] = torch.arange(positions.start, positions.stop, dtype=torch.long)
        return batch


def evaluation_batches(dataset, *, num_samples: int, micro_batch_size: int, dp_rank: int,
                       dp_size: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches over the first ``num_samples`` samples of ``dataset``.

    Samples are dealt round-robin over ranks in micro-batch-sized slices; every rank gets the same
    number of micro-batches (the last ones padded by repeating sample 0 with a zero loss mask), so
    the collective schedule matches and no sample is counted twice.
    """
    total = min(num_samples, len(dataset))
    step = micro_batch_size * dp_size
    num_steps = (total + step - 1) // step
    batches = []
    for k in range(num_steps):
        start = k * step + dp_rank * micro_batch_size
        indices = [i for i in range(start, start + micro_batch_size)]
        samples, valid = [], []
        for i in indices:
            samples.append(dataset[i if i < total else 0])
            valid.append(i < total)
        batch = collate(samples)
        batch["loss_mask"] = batch["loss_mask"] * torch.tensor(valid, dtype=batch["loss_mask"].dtype)[:, None]
        batches.append(batch)
    return batches
