"""Micro-batches for the training loop and for per-domain validation.

Training batches come from the mixing schedule, read in the main process only: no DataLoader
workers and no prefetch, so the weights DDK fixes for window j+1 at the end of window j are the ones
its first sample is drawn with (a GPTDataset sample is a cheap memory-mapped slice). Every sample
keeps its domain id; the loss function uses it for per-domain losses.

Shapes: b = micro-batch size, s = sequence length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from megatron_ddk.data.datasets import Samples
from megatron_ddk.data.mixing import DomainMixingSchedule, dp_micro_batch_indices

FIELDS = ("tokens", "labels", "loss_mask", "position_ids")
"""Keys taken from every GPTDataset sample (each [s])."""


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack GPTDataset samples into ``[b, s]`` tensors."""
    missing = [key for key in FIELDS if key not in samples[0]]
    if missing:
        raise KeyError(
            f"dataset samples lack {', '.join(missing)}; expected GPTDataset samples with {FIELDS}"
        )
    return {key: torch.stack([torch.as_tensor(sample[key]) for sample in samples]) for key in FIELDS}


class MixedDomainBatches:
    """Iterator over this DP rank's micro-batches, iteration after iteration, from ``start_iteration``.

    Each micro-batch: ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` [b, s] and ``domain_id``,
    ``sample_id`` (domain-local), ``global_position`` [b] int64.
    """

    def __init__(
        self,
        datasets: Sequence[Samples],
        schedule: DomainMixingSchedule,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        start_iteration: int = 0,
    ):
        if len(datasets) != schedule.num_domains:
            raise ValueError(f"{len(datasets)} datasets for a schedule of {schedule.num_domains} domains")
        sizes = [len(d) for d in datasets]
        if sizes != schedule.domain_sizes.tolist():
            raise ValueError(
                f"dataset sizes {sizes} differ from the schedule's {schedule.domain_sizes.tolist()}"
            )
        if start_iteration < 0:
            raise ValueError(f"start iteration must be >= 0, got {start_iteration}")
        dp_micro_batch_indices(
            0,
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
        )  # validates the sizes now, not mid-training
        self.datasets = list(datasets)
        self.schedule = schedule
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_microbatches = global_batch_size // (micro_batch_size * dp_size)
        self._iteration = start_iteration
        self._pending: list[range] = []

    @property
    def iteration(self) -> int:
        """The iteration whose first micro-batch comes next, once the current one is used up."""
        return self._iteration

    def __iter__(self) -> MixedDomainBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self._pending:
            self._pending = dp_micro_batch_indices(
                self._iteration,
                global_batch_size=self.global_batch_size,
                micro_batch_size=self.micro_batch_size,
                dp_rank=self.dp_rank,
                dp_size=self.dp_size,
            )
            self._iteration += 1
        positions = self._pending.pop(0)
        domains, samples = self.schedule.lookup(positions.start, positions.stop)  # [b], [b]
        batch = collate([self.datasets[d][int(i)] for d, i in zip(domains.tolist(), samples.tolist())])
        batch["domain_id"] = torch.as_tensor(domains, dtype=torch.long)
        batch["sample_id"] = torch.as_tensor(samples, dtype=torch.long)
        batch["global_position"] = torch.arange(positions.start, positions.stop, dtype=torch.long)
        return batch


def evaluation_batches(
    dataset: Samples, *, num_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches over the first ``min(num_samples, len(dataset))`` samples of ``dataset``.

    Samples are dealt like training positions: step k covers samples [k*mbs*dp, (k+1)*mbs*dp) and rank
    r takes the r-th ``micro_batch_size`` slice. Every rank gets the same number of micro-batches (the
    collective schedule must match); rows past the end repeat sample 0 with a zero ``loss_mask`` and
    ``sample_id`` -1, so summing masked tokens over ranks counts each sample exactly once.
    Each batch: the ``FIELDS`` [b, s] plus ``sample_id`` [b] int64.
    """
    if num_samples <= 0:
        raise ValueError(f"--ddk-val-samples must be > 0, got {num_samples}")
    dp_micro_batch_indices(
        0,
        global_batch_size=micro_batch_size * dp_size,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )  # validates rank and sizes
    total = min(num_samples, len(dataset))
    step = micro_batch_size * dp_size
    batches = []
    for first in range(0, total, step):
        start = first + dp_rank * micro_batch_size
        indices = list(range(start, start + micro_batch_size))
        valid = torch.tensor([i < total for i in indices])  # [b]
        batch = collate([dataset[i if i < total else 0] for i in indices])
        batch["loss_mask"] = batch["loss_mask"] * valid.to(batch["loss_mask"].dtype)[:, None]
        batch["sample_id"] = torch.tensor([i if i < total else -1 for i in indices], dtype=torch.long)
        batches.append(batch)
    return batches
