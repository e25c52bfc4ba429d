"""Run under torchrun with CP = world size: the all-gather CP attention against full causal attention.

Every rank builds the same full q, k, v [s, b, n, hn] (GQA: 4 query heads, 2 key/value groups), keeps
its two chunks (as ``training.step.context_parallel_chunks`` cuts a batch), runs
``AllGatherContextParallelAttention`` and compares its output and the gradients of its q, k and v rows
with full-sequence causal attention in float64. Writes one JSON record per rank (rank 0 gathers).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

HEADS, GROUPS, HEAD_DIM, SEQ, BATCH = 4, 2, 8, 16, 2


def reference(q, k, v):
    """Full causal attention [s, b, np, hn] -> [s, b, np*hn], GQA by repeating the groups."""
    k = k.repeat_interleave(HEADS // GROUPS, dim=2)
    v = v.repeat_interleave(HEADS // GROUPS, dim=2)
    scores = torch.einsum("sbnh,tbnh->bnst", q, k) / HEAD_DIM**0.5
    future = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return torch.einsum("bnst,tbnh->sbnh", probs, v).reshape(SEQ, BATCH, HEADS * HEAD_DIM)


def main() -> None:
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ddk.models.cp_attention import AllGatherContextParallelAttention, chunk_positions
    from megatron_ddk.platform.distributed import ParallelLayout, destroy, initialize, set_seed
    from megatron_ddk.training.step import context_parallel_chunks

    world = int(__import__("os").environ["WORLD_SIZE"])
    pg = initialize(ParallelLayout(world_size=world, context_parallel_size=world))
    set_seed(7, pg)
    cp_rank, cp_size = dist.get_rank(pg.cp), dist.get_world_size(pg.cp)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        kv_channels=HEAD_DIM,
        context_parallel_size=cp_size,
        attention_softmax_in_fp32=True,
        attention_dropout=0.0,
        use_cpu_initialization=True,
    )
    attention = AllGatherContextParallelAttention(
        config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self", pg_collection=pg
    )

    gen = torch.Generator().manual_seed(0)
    full = {
        "q": torch.randn(SEQ, BATCH, HEADS, HEAD_DIM, generator=gen, dtype=torch.float64),
        "k": torch.randn(SEQ, BATCH, GROUPS, HEAD_DIM, generator=gen, dtype=torch.float64),
        "v": torch.randn(SEQ, BATCH, GROUPS, HEAD_DIM, generator=gen, dtype=torch.float64),
    }
    weights = torch.randn(SEQ, BATCH, HEADS * HEAD_DIM, generator=gen, dtype=torch.float64)
    leaves = {name: t.clone().requires_grad_() for name, t in full.items()}
    (reference(leaves["q"], leaves["k"], leaves["v"]) * weights).sum().backward()

    # the batch split of training.step, on [b, s] positions and a [b, s, k] per-position field
    positions = chunk_positions(SEQ // cp_size, cp_rank, cp_size)
    batch = {
        "tokens": torch.arange(SEQ).repeat(BATCH, 1),
        "rows": torch.arange(SEQ)[None, :, None].expand(BATCH, SEQ, 3).clone(),
        "domain_id": torch.arange(BATCH),
        "teacher_ce_sum": torch.ones(BATCH),
    }
    mine = context_parallel_chunks(batch, pg.cp)
    split_ok = (
        torch.equal(mine["tokens"][0], positions)
        and torch.equal(mine["rows"][1, :, 2], positions)
        and torch.equal(mine["domain_id"], batch["domain_id"])
        and float(mine["teacher_ce_sum"].sum()) == (BATCH if cp_rank == 0 else 0)
    )

    local = {name: t[positions].float().clone().requires_grad_() for name, t in full.items()}
    out = attention(local["q"], local["k"], local["v"], None)
    (out.double() * weights[positions]).sum().backward()
    expected = reference(full["q"], full["k"], full["v"])[positions]
    record = {
        "cp_rank": cp_rank,
        "cp_size": cp_size,
        "split_ok": split_ok,
        "out_err": float((out.double() - expected).abs().max()),
        "out_scale": float(expected.abs().max()),
        **{
            f"grad_{name}_err": float((local[name].grad.double() - leaves[name].grad[positions]).abs().max())
            for name in full
        },
        "grad_scale": min(float(leaves[name].grad.abs().max()) for name in full),
    }
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as handle:
            json.dump(records, handle)
    destroy()


if __name__ == "__main__":
    main()
