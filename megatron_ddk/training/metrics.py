"""Turn the per-micro-batch reports of the last pipeline stage into numbers every rank agrees on.

megatron-core returns the loss function's reports only on the last pipeline stage, and each DP rank
saw its own slice of the batch (each CP rank its chunks of the sequences). ``reduce_reports`` sums the
micro-batches, all-reduces the sums over the data- and context-parallel group (``pg.dp_cp``), and
broadcasts the result from the last stage to the whole pipeline, so logging, DDK's weight update and
checkpointing see identical values on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ddk.platform import distributed


def reduce_reports(
    reports: list[dict[str, torch.Tensor]], layout: dict[str, int], pg
) -> dict[str, torch.Tensor]:
    """Sum ``reports`` over micro-batches and ranks. ``layout`` maps each key to its vector length;
    ``pg``: the ProcessGroupCollection (sum over ``pg.dp_cp``, broadcast over ``pg.pp``).

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
                flat[offset : offset + layout[key]] += report[key].to(device=device, dtype=torch.float64)
        offset += layout[key]
    if distributed.is_pp_last_stage(pg):
        dist.all_reduce(flat, group=pg.dp_cp)
    pp_size = dist.get_world_size(pg.pp)
    if pp_size > 1:
        dist.broadcast(flat, group_src=pp_size - 1, group=pg.pp)
    result, offset = {}, 0
    for key in keys:
        result[key] = flat[offset : offset + layout[key]].cpu()
        offset += layout[key]
    return result


def mean(pair: torch.Tensor) -> float:
    """Mean from a ``[sum, count]`` pair (NaN when nothing was counted)."""
    return float(pair[0] / pair[1]) if pair[1] > 0 else float("nan")
