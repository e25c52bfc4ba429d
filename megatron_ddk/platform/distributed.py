"""Process-group and device set-up from the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, ...).

One validated topology object (``ParallelLayout``) says how the world splits into TP x CP x PP x DP;
``initialize`` starts torch.distributed (nccl on GPU, gloo on CPU), builds megatron-core's
parallel state once and returns its groups as one ``ProcessGroupCollection`` (``pg``). Everything
that runs a collective receives ``pg`` (or the one group it needs) as an argument, so each call
site shows which group it runs over; nothing below start-up calls ``parallel_state`` getters.
``set_seed`` seeds every generator the way Megatron does (a PP-rank offset, TP-specific
model-parallel streams).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron_ddk.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class ParallelLayout:
    """How ``world_size`` ranks split into tensor x context x pipeline x data parallel groups."""

    world_size: int
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    """CP: each sequence split over CP ranks, which see the same samples (one DP replica)."""
    expert_model_parallel_size: int = 1
    """EP, carved out of data parallelism: experts are split over EP ranks, each with TP x PP."""

    def __post_init__(self) -> None:
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if (
            min(
                self.tensor_model_parallel_size,
                self.pipeline_model_parallel_size,
                self.context_parallel_size,
                self.expert_model_parallel_size,
            )
            < 1
        ):
            raise ConfigError(
                "--tensor-model-parallel-size, --pipeline-model-parallel-size, --context-parallel-size and "
                "--expert-model-parallel-size must be >= 1"
            )
        if self.world_size % (model_parallel * self.context_parallel_size) != 0:
            raise ConfigError(
                f"world size {self.world_size} is not divisible by --tensor-model-parallel-size "
                f"({self.tensor_model_parallel_size}) x --pipeline-model-parallel-size "
                f"({self.pipeline_model_parallel_size}) x --context-parallel-size "
                f"({self.context_parallel_size}); change the sizes or the number of processes"
            )
        if self.world_size % (model_parallel * self.expert_model_parallel_size) != 0:
            raise ConfigError(
                f"world size {self.world_size} is not divisible by --expert-model-parallel-size "
                f"({self.expert_model_parallel_size}) x --tensor-model-parallel-size ({self.tensor_model_parallel_size}) "
                f"x --pipeline-model-parallel-size ({self.pipeline_model_parallel_size}); change the sizes or the "
                "number of processes"
            )

    @property
    def ep_enabled(self) -> bool:
        return self.expert_model_parallel_size > 1

    @property
    def data_parallel_size(self) -> int:
        """Replicas that see different samples (CP ranks of a replica share theirs)."""
        return self.world_size // (
            self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size
        )

    @property
    def pp_enabled(self) -> bool:
        return self.pipeline_model_parallel_size > 1


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0"))


def device() -> torch.device:
    """The device this rank computes on: its local GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize(layout: ParallelLayout, *, distributed_timeout_minutes: int = 10):
    """Start torch.distributed and megatron-core's parallel state for ``layout``; return its groups.

    The returned ``ProcessGroupCollection`` is the only way the rest of the code reaches a process
    group. Works without torchrun too (a single process): the rendezvous then uses a local TCP store.
    """
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_ddk.platform.cpu_compat import apply_cpu_compat

    apply_cpu_compat()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "nccl"
        else:
            backend = "gloo"
        # under torchrun the rendezvous comes from the environment; a plain single process gets a
        # private TCP store (without touching os.environ, which child processes would inherit)
        init_method = "env://" if "MASTER_ADDR" in os.environ else f"tcp://127.0.0.1:{_free_port()}"
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=rank_from_env(),
            world_size=world_size_from_env(),
            timeout=timedelta(minutes=distributed_timeout_minutes),
        )
    if dist.get_world_size() != layout.world_size:
        raise RuntimeError(
            f"layout is for {layout.world_size} ranks but the world has {dist.get_world_size()}"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor_model_parallel_size,
            pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
            context_parallel_size=layout.context_parallel_size,
            expert_model_parallel_size=layout.expert_model_parallel_size,
        )
    return ProcessGroupCollection.use_mpu_process_groups()


def is_pp_first_stage(pg) -> bool:
    """Whether this rank holds the first pipeline stage (``pg``: a ProcessGroupCollection)."""
    return dist.get_rank(pg.pp) == 0


def is_pp_last_stage(pg) -> bool:
    """Whether this rank holds the last pipeline stage (``pg``: a ProcessGroupCollection)."""
    return dist.get_rank(pg.pp) == dist.get_world_size(pg.pp) - 1


def set_seed(seed: int, pg) -> None:
    """Seed python, numpy and torch; each PP stage gets its own offset and TP ranks their own stream.

    Under torchrun every process starts with a different torch seed, so this must run before any
    model is built, or data-parallel replicas start from different weights.
    """
    from megatron.core import tensor_parallel

    from megatron_ddk.platform.cpu_compat import reseed_rng_tracker

    stage_seed = seed + 100 * dist.get_rank(pg.pp)
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    reseed_rng_tracker()
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed, tp_rank=dist.get_rank(pg.tp))


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank_0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
