"""Two ranks at TP=2: megatron-core's gather_from_tensor_model_parallel_region works on CPU (gloo).

Forward: each rank holds one half of the last dimension; the gather returns the full tensor.
Backward: the gradient that reaches each rank's half is its slice of the upstream gradient.
Writes {rank: {"forward": bool, "backward": bool}} to the JSON path given as the only argument.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist


def main(out_path: str) -> None:
    from megatron.core import parallel_state, tensor_parallel

    from megatron_ddk.platform.distributed import ParallelLayout, destroy, initialize

    initialize(ParallelLayout(world_size=2, tensor_model_parallel_size=2))
    rank = parallel_state.get_tensor_model_parallel_rank()
    full = torch.arange(24, dtype=torch.float32).view(2, 3, 4)  # [s, b, h]
    local = full[..., rank * 2 : (rank + 1) * 2].clone().requires_grad_(True)  # [s, b, h/2]
    gathered = tensor_parallel.gather_from_tensor_model_parallel_region(local)
    upstream = torch.linspace(-1.0, 1.0, full.numel()).view_as(full)
    (gathered * upstream).sum().backward()
    result = {
        "forward": gathered.device.type == "cpu" and torch.equal(gathered, full),
        "backward": torch.equal(local.grad, upstream[..., rank * 2 : (rank + 1) * 2]),
    }
    results = [None, None]
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        with open(out_path, "w") as fh:
            json.dump({str(r): res for r, res in enumerate(results)}, fh)
    destroy()


if __name__ == "__main__":
    main(sys.argv[1])
