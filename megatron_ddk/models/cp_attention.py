"""Core attention under context parallelism without Transformer Engine: the all-gather form.

megatron-core's local ``DotProductAttention`` refuses CP > 1 (only TE's attention implements it, on
GPU). Here each CP rank holds two chunks of every sequence: chunks r and 2*CP-1-r of 2*CP equal
chunks (``training.step.context_parallel_chunks`` cuts the batch; RoPE is sliced the same way by
megatron-core). The attention all-gathers the keys and values of the whole sequence over the CP
group (the backward reduce-scatters their gradients back to the ranks that own them), puts the
gathered chunks back in sequence order and masks causally by the GLOBAL positions of the local
queries. This is the form Llama 3 trained with; it keeps the whole sequence's K/V on every rank
during a layer (scores are ``[b, np, s/CP, s]``), unlike TE's ring (p2p) exchange.
"""

from __future__ import annotations

import math

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from megatron_ddk.errors import ConfigError


def chunk_positions(local_length: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Global sequence positions [s/CP] of a CP rank's two chunks (chunk r, then chunk 2*CP-1-r)."""
    chunk = local_length // 2
    first, second = cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


def sequence_order(gathered: torch.Tensor, cp_size: int) -> torch.Tensor:
    """Rank-ordered chunks ``[CP * s/CP, ...]`` of an all-gather -> sequence order ``[s, ...]``.

    Rank r's block holds chunks (r, 2*CP-1-r); sequence chunk j sits at block slot 2r (j = r < CP)
    or 2r+1 (j = 2*CP-1-r)."""
    slots = [2 * j if j < cp_size else 2 * (2 * cp_size - 1 - j) + 1 for j in range(2 * cp_size)]
    chunks = gathered.view(2 * cp_size, gathered.shape[0] // (2 * cp_size), *gathered.shape[1:])
    ordered = chunks.index_select(0, torch.tensor(slots, device=gathered.device))
    return ordered.view(gathered.shape)


class AllGatherContextParallelAttention(MegatronModule):
    """Drop-in core attention (the local spec's ``DotProductAttention`` signature) for CP > 1."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ConfigError(
                f"--context-parallel-size {config.context_parallel_size} without Transformer Engine supports "
                f"causal self-attention only (got {attn_mask_type.name}); use --context-parallel-size 1"
            )
        if config.window_size is not None or config.softmax_type != "vanilla":
            raise ConfigError(
                f"--context-parallel-size {config.context_parallel_size} without Transformer Engine supports "
                "full-window attention with the plain softmax only; use --context-parallel-size 1"
            )
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group = pg_collection.cp
        tp_size = pg_collection.tp.size()
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups, tp_size)
        self.head_dim = config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim) if softmax_scale is None else softmax_scale
        self.softmax_in_fp32 = config.attention_softmax_in_fp32
        self.attention_dropout = torch.nn.Dropout(
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def _whole_sequence(self, local: torch.Tensor) -> torch.Tensor:
        """[s/CP, b, ng, hn] of this rank -> [s, b, ng, hn] in sequence order (backward: reduce-scatter)."""
        gathered = tensor_parallel.gather_from_sequence_parallel_region(
            local, tensor_parallel_output_grad=True, group=self.cp_group
        )
        return sequence_order(gathered, self.cp_group.size())

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """query [s/CP, b, np, hn], key/value [s/CP, b, ng, hn] (this rank's chunks) -> [s/CP, b, np*hn].

        ``attention_mask`` is ignored: the causal mask comes from the global positions (the GPT model
        passes none, or megatron's causal one)."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ConfigError(
                "packed sequences and attention bias are not supported with --context-parallel-size > 1 "
                "without Transformer Engine; use --context-parallel-size 1"
            )
        local_length = query.shape[0]
        key, value = self._whole_sequence(key), self._whole_sequence(value)
        repeat = self.heads_per_partition // self.groups_per_partition
        if repeat > 1:  # GQA: each key/value group serves ``repeat`` query heads
            key = key.repeat_interleave(repeat, dim=2)
            value = value.repeat_interleave(repeat, dim=2)
        positions = chunk_positions(local_length, self.cp_group.rank(), self.cp_group.size()).to(query.device)
        future = torch.arange(key.shape[0], device=query.device)[None, :] > positions[:, None]  # [s/CP, s]
        scores = torch.matmul(query.permute(1, 2, 0, 3), key.permute(1, 2, 3, 0)) * self.softmax_scale
        if self.softmax_in_fp32:
            scores = scores.float()
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1).to(query.dtype)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            probs = self.attention_dropout(probs)  # [b, np, s/CP, s]
        context = torch.matmul(probs, value.permute(1, 2, 0, 3))  # [b, np, s/CP, hn]
        return context.permute(2, 0, 1, 3).reshape(local_length, query.shape[1], -1)
