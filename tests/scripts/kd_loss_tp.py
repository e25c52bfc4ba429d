"""KD losses at TP=2 against the full-vocabulary reference on gathered logits (run under torchrun, 2 ranks).

Usage: kd_loss_tp.py OUT.json. Rank 0 writes one record per case: the largest loss and gradient
errors, their scales, the largest gradient on padding columns, and whether both ranks agree.
"""

import itertools
import json
import sys

import torch
import torch.distributed as dist

S, B, V_LOCAL = 5, 2, 24  # [s, b] = 10 tokens; padded vocab 48 split over 2 ranks
KINDS = ("forward_kl", "reverse_kl", "jsd")


def full_logits(seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(S, B, 2 * V_LOCAL, generator=g) * 3.0).to(dtype)  # [s, b, v]


def run_case(kind, temperature, chunk, vocab_size, dtype, group, rank) -> dict:
    from megatron_ddk.distill.kd_loss import reference_kd_loss, vocab_parallel_kd_loss

    student, teacher = full_logits(0, dtype), full_logits(1, dtype)
    weights = torch.rand(S, B, generator=torch.Generator().manual_seed(2))  # non-uniform upstream gradient
    cols = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
    local = student[..., cols].clone().requires_grad_()  # [s, b, v_local]
    loss = vocab_parallel_kd_loss(
        local,
        teacher[..., cols].clone(),
        kind=kind,
        temperature=temperature,
        jsd_beta=0.3,
        chunk_size=chunk,
        vocab_size=vocab_size,
        tp_group=group,
    )
    (loss * weights).sum().backward()

    ref_student = student.clone().requires_grad_()
    ref = reference_kd_loss(
        ref_student, teacher, kind=kind, temperature=temperature, jsd_beta=0.3, vocab_size=vocab_size
    )
    (ref * weights).sum().backward()

    grads = [torch.empty_like(local.grad) for _ in range(2)]
    dist.all_gather(grads, local.grad.contiguous())
    losses = [torch.empty_like(loss) for _ in range(2)]
    dist.all_gather(losses, loss.detach())
    grad = torch.cat(grads, dim=-1).float()  # [s, b, v]
    ref_grad = ref_student.grad.float()
    return {
        "case": f"{kind} T={temperature} chunk={chunk} vocab={vocab_size} {str(dtype)[6:]}",
        "dtype": str(dtype)[6:],
        "loss_err": (loss.detach() - ref.detach()).abs().max().item(),
        "loss_scale": ref.detach().abs().max().item(),
        "grad_err": (grad - ref_grad).abs().max().item(),
        "grad_scale": ref_grad.abs().max().item(),
        "padding_grad_max": grad[..., vocab_size:].abs().max().item() if vocab_size else 0.0,
        "ranks_agree": torch.equal(losses[0], losses[1]),
    }


def main() -> None:
    out = sys.argv[1]
    import torch.distributed as dist

    from megatron_ddk.platform.distributed import ParallelLayout, destroy, initialize

    pg = initialize(ParallelLayout(world_size=2, tensor_model_parallel_size=2))
    rank = dist.get_rank(pg.tp)
    records = []
    # vocab sizes: no padding, padding inside rank 1, rank 1 all padding
    for kind, temperature, chunk, vocab_size in itertools.product(KINDS, (1.0, 2.0), (0, 3), (None, 41, 24)):
        records.append(run_case(kind, temperature, chunk, vocab_size, torch.float32, pg.tp, rank))
    for kind in KINDS:  # bf16 logits
        records.append(run_case(kind, 1.0, 4, 41, torch.bfloat16, pg.tp, rank))
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(records, handle, indent=1)
    destroy()


if __name__ == "__main__":
    main()
