"""Turn the per-micro-batch reports of the last pipeline stage into numbers every rank agrees on.

megatron-core returns the loss function's reports only on the last pipeline stage, and each DP rank
saw its own slice of the batch. ``reduce_reports`` sums the micro-batches, all-reduces the sums over
the data-parallel group, and broadcasts the result from the last stage to the whole pipeline, so
logging, DDK's weight update and checkpointing see identical values on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ddk.platform import distributed


def reduce_reports(reports: list[dict[str, torch.Tensor]], layout: dict[str, int]) -> dict[str, torch.Tensor]:
    """Sum ``reports`` over micro-batches and ranks. ``layout`` maps each key to its vector length.

    Keys absent from the reports (e.g. no teacher) come back as zeros, so every rank runs the same
    collectives.
    """
    device = distributed.device()
    keys = sorted(layout)
    flat = torch.zeros(sum(layout.values()), dtype=torch.float64, device=device)
    offset = 0
    for key in keys:
        for report in reports:
            if key in report:
                flat[offset: offset + layout[key]] += report[key].to(device=device, dtype=torch.float64)
        offset += layout[key]
    if dist.is_initialized():
        if parallel_state.is_pipeline_last_stage():
            dist.all_reduce(flat, group=parallel_state.get_data_parallel_group())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(flat, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
    result, offset = {}, 0
    for key in keys:
        result[key] = flat[offset: offset + layout[key]].cpu()
        offset += layout[key]
    return result


def mean(pair: torch.Tensor) -> float:
    """Mean from a ``[sum, count]`` pair (NaN when nothing was counted)."""
    return float(pair[0] / pair[1]) if pair[1] > 0 else float("nan")
