"""Make megatron-core 0.16.1 run on CPU with gloo when CUDA is absent.

megatron-core hard-codes CUDA in a handful of places (RNG tracker, RoPE, a scratch buffer, the
default causal mask, the pipeline schedules, DDP grad buffers, grad clipping, dist_checkpointing and
the mixed-precision optimizers' type checks). Each patch below replaces exactly one of those spots
with a device-neutral equivalent. ``apply_cpu_compat()`` applies them all, once, and only when
``torch.cuda.is_available()`` is False: on a GPU host this module changes nothing.

The patches target the exact source of megatron-core 0.16.1 (``megatron_ddk.__init__`` refuses any
other version); ``tests/unit/test_cpu_compat.py`` has one test per patch.
"""

from __future__ import annotations

import contextlib
import importlib
import operator
from collections.abc import Callable, Iterator
from functools import cache, reduce

import torch

_APPLIED: list[str] = []


class _CpuCudaNamespace:
    """Stands in for ``torch.cuda`` inside patched megatron modules: the current device is the CPU."""

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(*_args, **_kwargs) -> None:
        return None


class _CpuTorchProxy:
    """Stands in for the module-global ``torch`` of a patched megatron module.

    Factory functions asked for ``device="cuda"`` allocate on the CPU instead; everything else is
    the real ``torch``.
    """

    cuda = _CpuCudaNamespace()
    _FACTORIES = frozenset({"zeros", "ones", "empty", "tensor", "full", "arange", "zeros_like", "empty_like"})

    def __getattr__(self, name: str):
        attr = getattr(torch, name)
        if name not in self._FACTORIES:
            return attr

        def factory(*args, **kwargs):
            device = kwargs.get("device")
            if device is not None and str(device).startswith("cuda"):
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return factory


# Modules whose module-level `torch` is swapped for the proxy, grouped by subsystem.
PROXIED_MODULES: dict[str, tuple[str, ...]] = {
    "schedules": (
        "megatron.core.pipeline_parallel.schedules",
        "megatron.core.pipeline_parallel.p2p_communication",
    ),
    "ddp_and_optimizer": (
        "megatron.core.distributed.param_and_grad_buffer",
        "megatron.core.distributed.distributed_data_parallel",
        "megatron.core.distributed.finalize_model_grads",
        "megatron.core.optimizer.optimizer",
        "megatron.core.optimizer.distrib_optimizer",
        "megatron.core.optimizer.clip_grads",
        "megatron.core.utils",
    ),
    "tensor_parallel": (
        "megatron.core.tensor_parallel.mappings",
        "megatron.core.tensor_parallel.layers",
        "megatron.core.tensor_parallel.data",
        "megatron.core.tensor_parallel.utils",
        "megatron.core.tensor_parallel.cross_entropy",
    ),
    "dist_checkpointing": (
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
        "megatron.core.dist_checkpointing.strategies.state_dict_saver",
        "megatron.core.dist_checkpointing.strategies.async_utils",
        "megatron.core.dist_checkpointing.strategies.torch",
        "megatron.core.dist_checkpointing.strategies.fully_parallel",
        "megatron.core.dist_checkpointing.exchange_utils",
        "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    ),
    "moe": (
        "megatron.core.transformer.moe.router",
        "megatron.core.transformer.moe.moe_utils",
        "megatron.core.transformer.moe.token_dispatcher",
        "megatron.core.transformer.moe.experts",
        "megatron.core.transformer.moe.moe_layer",
        "megatron.core.transformer.moe.shared_experts",
    ),
}


def _proxy_modules(group: str) -> None:
    for name in PROXIED_MODULES[group]:
        importlib.import_module(name).torch = _CpuTorchProxy()


def patch_rng_tracker() -> None:
    """The model-parallel RNG tracker saves CUDA generator states; keep CPU generator states instead."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

        def get_states(self):
            return {name: state.clone() for name, state in self.states_.items()}

        def set_states(self, states):
            self.states_ = {name: state.clone() for name, state in states.items()}

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            saved = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(saved)

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom.CpuRNGStatesTracker = CpuRNGStatesTracker


def patch_rope() -> None:
    """RotaryEmbedding.get_emb moves inv_freq to the current CUDA device; keep it where it is."""
    from megatron.core.models.common.embeddings import rotary_pos_embedding as rope

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # [s, dim/2]
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
        return emb[:, None, None, :]  # [s, 1, 1, dim]

    rope.RotaryEmbedding.get_emb = get_emb


def patch_rope_context_parallel() -> None:
    """get_pos_emb_on_this_cp_rank (CP > 1) builds its chunk index in pinned memory and moves it to the
    CUDA device; build it on the embedding's device (imported by name in two modules)."""
    from megatron.core.models.common.embeddings import (
        rope_utils,
        rotary_pos_embedding,
        yarn_rotary_pos_embedding,
    )

    def get_pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
        if cp_group is None:
            raise ValueError("cp_group must be provided to get positional embedding per CP rank")
        cp_size, cp_rank = cp_group.size(), cp_group.rank()
        index = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
        pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1 :])
        pos_emb = pos_emb.index_select(seq_dim, index)
        return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2 :])

    for module in (rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding):
        module.get_pos_emb_on_this_cp_rank = get_pos_emb_on_this_cp_rank


def patch_global_memory_buffer() -> None:
    """The attention scratch buffer allocates on the current CUDA device; allocate on the CPU."""
    from megatron.core import utils as mutils

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        numel = reduce(operator.mul, tensor_shape, 1)
        buffer = self.buffer.get((name, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device="cpu", requires_grad=False)
            self.buffer[(name, dtype)] = buffer
        return buffer[0:numel].view(*tensor_shape)

    mutils.GlobalMemoryBuffer.get_tensor = get_tensor


def patch_causal_mask() -> None:
    """get_default_causal_mask builds its mask with device="cuda" (imported by name in two modules)."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    @cache
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()

    tutils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask


def patch_schedules() -> None:
    """The pipeline schedules and p2p allocate token counters and buffers on the CUDA device."""
    _proxy_modules("schedules")


def patch_ddp_and_optimizer() -> None:
    """DDP grad buffers, grad finalisation and the optimizers allocate on the CUDA device."""
    _proxy_modules("ddp_and_optimizer")


def patch_tensor_parallel() -> None:
    """TP gathers and the vocab-parallel helpers use torch.cuda.current_device()."""
    _proxy_modules("tensor_parallel")


def patch_activation_recompute() -> None:
    """Activation recomputation (``tensor_parallel.checkpoint``) saves and restores the CUDA generator's
    state around each recomputed block; on CPU there is none (the CPU generator and the CPU RNG tracker
    are saved and restored by the same code)."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *args, **kwargs: None
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None


def patch_dist_checkpointing() -> None:
    """The torch_dist save/load strategies synchronize CUDA and stage tensors on the CUDA device."""
    _proxy_modules("dist_checkpointing")


def patch_moe() -> None:
    """The MoE router moves its weight to the CUDA device at each forward; the token dispatchers and
    expert MLPs allocate counters and buffers there. Without Transformer Engine, moe_utils never
    defines ``te_general_gemm`` but the router's linear tests it against None: define it as None."""
    from megatron.core.transformer.moe import moe_utils

    _proxy_modules("moe")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def patch_clip_grads() -> None:
    """clip_grad_by_total_norm_fp32 asserts each grad is a torch.cuda.FloatTensor."""
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            for param in parameters:
                grad = param.decoupled_grad if use_decoupled_grad else param.grad
                if grad is not None:
                    grad.detach().mul_(clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    moptimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


@contextlib.contextmanager
def cuda_type_names() -> Iterator[None]:
    """While active, CPU tensors report ``torch.cuda.*Tensor`` from ``Tensor.type()``.

    Only used around the constructors of the mixed-precision and distributed optimizers, which sort
    parameters by those type names; nothing else sees the changed names.
    """
    original = torch.Tensor.type

    def type_with_cuda_names(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            if self.device.type == "cpu" and name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch.") :]
            return name
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_with_cuda_names
    try:
        yield
    finally:
        torch.Tensor.type = original


def patch_optimizer_type_checks() -> None:
    """Float16OptimizerWithFloat16Params and DistributedOptimizer accept only torch.cuda.* params."""
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.optimizer import optimizer as moptimizer

    for cls in (moptimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        original_init = cls.__init__
        if getattr(original_init, "_cpu_compat", False):
            continue

        def init(self, *args, __original=original_init, **kwargs):
            with cuda_type_names():
                __original(self, *args, **kwargs)

        init._cpu_compat = True
        cls.__init__ = init


PATCHES: dict[str, Callable[[], None]] = {
    "rng_tracker": patch_rng_tracker,
    "rope": patch_rope,
    "rope_context_parallel": patch_rope_context_parallel,
    "global_memory_buffer": patch_global_memory_buffer,
    "causal_mask": patch_causal_mask,
    "schedules": patch_schedules,
    "ddp_and_optimizer": patch_ddp_and_optimizer,
    "tensor_parallel": patch_tensor_parallel,
    "activation_recompute": patch_activation_recompute,
    "dist_checkpointing": patch_dist_checkpointing,
    "moe": patch_moe,
    "clip_grads": patch_clip_grads,
    "optimizer_type_checks": patch_optimizer_type_checks,
}


def apply_cpu_compat(force: bool = False) -> list[str]:
    """Apply every patch once when CUDA is absent (or ``force``); returns the names applied so far."""
    if (torch.cuda.is_available() and not force) or _APPLIED:
        return list(_APPLIED)
    for name, patch in PATCHES.items():
        patch()
        _APPLIED.append(name)
    return list(_APPLIED)


def reseed_rng_tracker() -> None:
    """Re-create the CPU tracker (tests and repeated model builds in one process need a fresh one)."""
    if "rng_tracker" in _APPLIED:
        patch_rng_tracker()
