"""Sparse top-k KD at TP=2 against the bucketed full-vocabulary reference (run under torchrun, 2 ranks), and
the sampled-tail variant (``--tail-samples``) against its single-process references.

Usage: topk_kd_loss_tp.py OUT.json. The teacher's top-k is extracted from its vocab-parallel shards
(``vocab_parallel_topk``) and must equal the full-vocabulary extraction; rank 0 writes one record
per case: the largest loss and gradient errors, their scales, padding gradients, rank agreement.
"""

import itertools
import json
import sys

import torch
import torch.distributed as dist

S, B, V_LOCAL = 5, 2, 24  # [s, b] = 10 tokens; padded vocab 48 split over 2 ranks
KINDS = ("forward_kl", "reverse_kl", "jsd")


def full_logits(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, B, 2 * V_LOCAL, generator=g) * 3.0  # [s, b, v]


def errors(loss, local, ref, ref_student, vocab_size, group) -> dict:
    """Largest loss and gradient errors against the reference (the gradient gathered from both ranks), their
    scales, the padding columns' gradient and whether both ranks computed the same loss."""
    grads = [torch.empty_like(local.grad) for _ in range(2)]
    dist.all_gather(grads, local.grad.contiguous(), group=group)
    losses = [torch.empty_like(loss) for _ in range(2)]
    dist.all_gather(losses, loss.detach(), group=group)
    grad = torch.cat(grads, dim=-1)  # [s, b, v]
    return {
        "loss_err": (loss.detach() - ref.detach()).abs().max().item(),
        "loss_scale": ref.detach().abs().max().item(),
        "grad_err": (grad - ref_student.grad).abs().max().item(),
        "grad_scale": ref_student.grad.abs().max().item(),
        "padding_grad_max": grad[..., vocab_size:].abs().max().item() if vocab_size else 0.0,
        "ranks_agree": torch.equal(losses[0], losses[1]),
    }


def run_case(kind, temperature, chunk, vocab_size, k, group, rank) -> dict:
    from megatron_ddk.distill.kd_loss import reference_kd_loss
    from megatron_ddk.distill.topk_kd_loss import (
        reference_topk_kd_loss,
        vocab_parallel_topk,
        vocab_parallel_topk_and_ce,
        vocab_parallel_topk_kd_loss,
    )

    student, teacher = full_logits(0), full_logits(1)
    weights = torch.rand(S, B, generator=torch.Generator().manual_seed(2))
    cols = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
    labels = torch.randint(0, vocab_size or 2 * V_LOCAL, (S * B,), generator=torch.Generator().manual_seed(4))
    ids, logp, tail, ce = vocab_parallel_topk_and_ce(
        teacher[..., cols].reshape(S * B, V_LOCAL),
        k,
        labels=labels,
        temperature=temperature,
        vocab_size=vocab_size,
        tp_group=group,
    )
    # megatron-core's CE: temperature 1, every column of the padded vocabulary
    ref_ce = torch.nn.functional.cross_entropy(teacher.reshape(S * B, -1), labels, reduction="none")
    ref_ids, ref_logp, ref_tail = vocab_parallel_topk(
        teacher.reshape(S * B, -1), k, temperature=temperature, vocab_size=vocab_size
    )
    local = student[..., cols].clone().requires_grad_()
    loss = vocab_parallel_topk_kd_loss(
        local,
        ids.reshape(S, B, k),
        logp.reshape(S, B, k),
        tail.reshape(S, B),
        kind=kind,
        temperature=temperature,
        jsd_beta=0.3,
        chunk_size=chunk,
        vocab_size=vocab_size,
        tp_group=group,
    )
    (loss * weights).sum().backward()

    ref_student = student.clone().requires_grad_()
    full_vocab = k == (vocab_size or 2 * V_LOCAL)
    if full_vocab:
        ref = reference_kd_loss(
            ref_student, teacher, kind=kind, temperature=temperature, jsd_beta=0.3, vocab_size=vocab_size
        )
    else:
        ref = reference_topk_kd_loss(
            ref_student, teacher, k, kind=kind, temperature=temperature, jsd_beta=0.3, vocab_size=vocab_size
        )
    (ref * weights).sum().backward()

    finite = torch.isfinite(ref_tail)
    return {
        "case": f"{kind} T={temperature} chunk={chunk} vocab={vocab_size} k={k}",
        "full_vocab": full_vocab,
        "topk_equal": torch.equal(ids, ref_ids)
        and torch.allclose(logp, ref_logp, rtol=1e-6, atol=1e-6)
        and torch.equal(finite, torch.isfinite(tail))
        and torch.allclose(tail[finite], ref_tail[finite], rtol=1e-5, atol=1e-6),
        "ce_err": (ce - ref_ce).abs().max().item(),
        **errors(loss, local, ref, ref_student, vocab_size, group),
    }


def run_sampled_case(temperature, chunk, vocab_size, block, group, rank) -> dict:
    """The top-5 plus 4 tail samples: the same tokens as the single-process textbook rule, the loss as its
    plain-PyTorch form (``--tail-samples``)."""
    from megatron_ddk.distill import topk_kd_loss as tk

    k, count = 5, 4
    tk._TAIL_BLOCK = block
    student, teacher = full_logits(0), full_logits(1)
    weights = torch.rand(S, B, generator=torch.Generator().manual_seed(2))
    draws = torch.rand(S * B, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cols = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
    ids, logp, tail, _ = tk.vocab_parallel_topk_and_ce(
        teacher[..., cols].reshape(S * B, V_LOCAL),
        k,
        temperature=temperature,
        vocab_size=vocab_size,
        tp_group=group,
        tail_samples=count,
        draws=draws,
    )
    flat = teacher.reshape(S * B, -1)
    ref_ids = tk.reference_tail_samples(flat, k, count, draws, temperature=temperature, vocab_size=vocab_size)
    log_p = torch.log_softmax(flat[:, :vocab_size] / temperature, dim=-1)
    local = student[..., cols].clone().requires_grad_()
    shaped = (ids.reshape(S, B, -1), logp.reshape(S, B, -1).half(), tail.reshape(S, B).half())
    loss = tk.vocab_parallel_topk_kd_loss(
        local,
        *shaped,
        temperature=temperature,
        chunk_size=chunk,
        vocab_size=vocab_size,
        tp_group=group,
        tail_samples=count,
    )
    (loss * weights).sum().backward()
    ref_student = student.clone().requires_grad_()
    ref = tk.reference_sampled_tail_kd_loss(
        ref_student, *shaped, count, temperature=temperature, vocab_size=vocab_size
    )
    (ref * weights).sum().backward()
    tk._TAIL_BLOCK = None
    return {
        "case": f"sampled tail T={temperature} chunk={chunk} vocab={vocab_size} block={block}",
        "sampled": True,
        "full_vocab": False,
        "topk_equal": torch.equal(ids[:, k:], ref_ids)
        and torch.equal(ids[:, :k], torch.topk(log_p, k, dim=-1).indices)
        and torch.allclose(logp, log_p.gather(1, ids), rtol=1e-5, atol=1e-6),
        "ce_err": 0.0,
        **errors(loss, local, ref, ref_student, vocab_size, group),
    }


def main() -> None:
    out = sys.argv[1]
    from megatron_ddk.platform.distributed import ParallelLayout, destroy, initialize

    pg = initialize(ParallelLayout(world_size=2, tensor_model_parallel_size=2))
    rank = dist.get_rank(pg.tp)
    group = pg.tp  # passed explicitly
    records = []
    # vocab sizes: no padding, padding inside rank 1, rank 1 all padding; k: sparse, and the whole vocabulary
    for kind, temperature, chunk, vocab_size in itertools.product(KINDS, (1.0, 2.0), (0, 3), (None, 41, 24)):
        for k in (5, vocab_size or 2 * V_LOCAL):
            records.append(run_case(kind, temperature, chunk, vocab_size, k, group, rank))
    for temperature, chunk, vocab_size, block in itertools.product(
        (1.0, 2.0), (0, 3), (None, 41, 24), (7, None)
    ):
        records.append(run_sampled_case(temperature, chunk, vocab_size, block, group, rank))
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(records, handle, indent=1)
    destroy()


if __name__ == "__main__":
    main()
