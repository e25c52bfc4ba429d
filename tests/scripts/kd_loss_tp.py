"""Vocab-parallel KD losses at TP=2 (gloo) against the full-vocabulary reference on gathered logits."""

import itertools
import json
import sys

import torch


def main() -> None:
    from megatron.core import parallel_state

    from megatron_ddk.distill.kd_loss import KD_KINDS, reference_kd_loss, vocab_parallel_kd_loss
    from megatron_ddk.platform.distributed import ParallelLayout, destroy, initialize

    initialize(ParallelLayout(world_size=2, tensor_model_parallel_size=2))
    rank = parallel_state.get_tensor_model_parallel_rank()
    results = []
    # full vocabulary 48 (two shards of 24); vocab_size 41 puts 7 padding columns on rank 1
    for kind, temperature, chunk, vocab_size in itertools.product(KD_KINDS, [1.0, 2.5], [0, 5], [None, 41]):
        g = torch.Generator().manual_seed(11)
        student_full = torch.randn(6, 2, 48, generator=g) * 3
        teacher_full = torch.randn(6, 2, 48, generator=g) * 3
        upstream = torch.rand(6, 2, generator=g)
        shard = slice(rank * 24, (rank + 1) * 24)
        student = student_full[..., shard].clone().requires_grad_()
        ours = vocab_parallel_kd_loss(student, teacher_full[..., shard], kind=kind, temperature=temperature,
                                      jsd_beta=0.3, chunk_size=chunk, vocab_size=vocab_size)
        (ours * upstream).sum().backward()
        reference_input = student_full.clone().requires_grad_()
        ref = reference_kd_loss(reference_input, teacher_full, kind=kind, temperature=temperature, jsd_beta=0.3,
                                vocab_size=vocab_size)
        (ref * upstream).sum().backward()
        results.append({
            "case": [kind, temperature, chunk, vocab_size],
            "loss_err": float((ours - ref).abs().max()),
            "grad_err": float((student.grad - reference_input.grad[..., shard]).abs().max()),
            "loss_scale": float(ref.abs().max()),
        })
    if rank == 0:
        with open(sys.argv[1], "w") as handle:
            json.dump(results, handle)
    destroy()


if __name__ == "__main__":
    main()
