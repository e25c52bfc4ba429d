"""Cost of distillation over continued pre-training: a KD iteration vs a CPT iteration of the same student.

    python benchmarks/distill_overhead.py                    # CPU defaults below
    python benchmarks/distill_overhead.py --pairs 20 --seq-length 512

Both iterations go through the path ``pretrain_ddk.py`` uses (DistillationModel, megatron-core DDP,
``get_forward_backward_func``, the Megatron optimizer, ``forward_step``/``loss_func``), in one process,
on the same batch: KD = student forward + backward + teacher forward (no_grad, eval) + KD loss; CPT =
the same model with the teacher switched off (``run_teacher = False``, KD weight 0). They alternate
(KD, CPT, KD, CPT, ...) so that both see the same machine load; the medians are compared.

Prediction from FLOPs: a training iteration costs ~6 N_s per token (forward 2 N_s, backward 4 N_s), the
teacher's forward 2 N_t, so KD / CPT = (6 N_s + 2 N_t) / (6 N_s). N counts the weights used in matrix
multiplications (layers and output layer; the input embedding is a lookup), plus the attention
score/value products (2 x seq x heads x head_dim per layer) so that short and long sequences are
predicted alike. Target: measured / predicted <= 1.10.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def matmul_weights_per_token(cfg, seq: int, vocab: int) -> float:
    """N: forward FLOPs per token / 2 (layers' GEMMs + attention products + output layer)."""
    attention = 2 * seq * cfg.num_attention_heads * cfg.head_dim
    return cfg.num_layers * (cfg.layer_matmul_parameters() + attention) + cfg.hidden_size * vocab


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--student", default="4,256,4,704", help="layers,hidden,heads,ffn")
    parser.add_argument("--teacher", default="8,384,6,1024", help="layers,hidden,heads,ffn")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--num-microbatches", type=int, default=2)
    parser.add_argument("--kd-chunk-size", type=int, default=None, help="default: the trainer's default")
    parser.add_argument("--warmup", type=int, default=2, help="pairs not timed")
    parser.add_argument("--pairs", type=int, default=10, help="timed (KD, CPT) pairs")
    args = parser.parse_args()

    import torch
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ddk.config import ModelConfig, ParallelConfig, PrecisionConfig
    from megatron_ddk.data.tokenizer import padded_vocab_size
    from megatron_ddk.distill.model import DistillationModel
    from megatron_ddk.models.gpt import build_gpt_model
    from megatron_ddk.platform.distributed import ParallelLayout, destroy, initialize, set_seed
    from megatron_ddk.platform.startup import prepare_process
    from megatron_ddk.training.step import LossSettings, forward_step

    prepare_process()
    pg = initialize(ParallelLayout(world_size=1))
    set_seed(1234, pg)

    def model_config(spec: str) -> ModelConfig:
        layers, hidden, heads, ffn = map(int, spec.split(","))
        return ModelConfig(
            num_layers=layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            ffn_hidden_size=ffn,
            vocab_size=args.vocab,
            max_position_embeddings=args.seq_length,
            swiglu=True,
            add_bias_linear=False,
            untie_embeddings_and_output_weights=True,
        )

    s_cfg, t_cfg = model_config(args.student), model_config(args.teacher)
    build = dict(pre_process=True, post_process=True)
    rows = dict(padded_vocab_size=padded_vocab_size(args.vocab, 1), pg=pg)
    student = build_gpt_model(s_cfg, ParallelConfig(), PrecisionConfig(), **build, **rows)
    teacher = build_gpt_model(t_cfg, ParallelConfig(), PrecisionConfig(), **build, **rows)
    wrapper = DistillationModel(student, teacher, **build)
    ddp = DistributedDataParallel(
        student.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), wrapper
    )
    student.config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, clip_grad=1.0), [ddp])
    student.config.grad_scale_func = optimizer.scale_loss
    settings = {
        "kd": LossSettings(
            num_domains=1, vocab_size=args.vocab, kd_weight=0.2, kd_chunk_size=args.kd_chunk_size
        ),
        "cpt": LossSettings(num_domains=1, vocab_size=args.vocab, kd_weight=0.0),
    }
    g = torch.Generator().manual_seed(0)
    mbs, seq = args.micro_batch_size, args.seq_length
    tokens = torch.randint(0, args.vocab, (mbs, seq + 1), generator=g)
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(mbs, seq),
        "position_ids": torch.arange(seq).expand(mbs, -1),
        "domain_id": torch.zeros(mbs, dtype=torch.long),
    }

    def batches():
        while True:
            yield batch

    data = batches()
    fb = get_forward_backward_func()

    def iteration(mode: str) -> float:
        wrapper.run_teacher = mode == "kd"
        start = time.perf_counter()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        fb(
            forward_step_func=partial(forward_step, settings=settings[mode], pg=pg),
            data_iterator=data,
            model=[ddp],
            num_microbatches=args.num_microbatches,
            seq_length=seq,
            micro_batch_size=mbs,
            forward_only=False,
        )
        optimizer.step()
        return time.perf_counter() - start

    times = {"kd": [], "cpt": []}
    for pair in range(args.warmup + args.pairs):
        for mode in ("kd", "cpt") if pair % 2 == 0 else ("cpt", "kd"):
            elapsed = iteration(mode)
            if pair >= args.warmup:
                times[mode].append(elapsed)
    destroy()

    n_s, n_t = (
        matmul_weights_per_token(s_cfg, seq, args.vocab),
        matmul_weights_per_token(t_cfg, seq, args.vocab),
    )
    predicted = (6 * n_s + 2 * n_t) / (6 * n_s)
    kd, cpt = statistics.median(times["kd"]), statistics.median(times["cpt"])
    measured = kd / cpt
    print(
        f"student {args.student} (N_s {n_s / 1e6:.1f}M per token), teacher {args.teacher} "
        f"(N_t {n_t / 1e6:.1f}M), vocab {args.vocab}, seq {seq}, {args.num_microbatches} x {mbs} sequences, "
        f"torch threads {torch.get_num_threads()}, {args.pairs} timed pairs"
    )
    print(f"CPT iteration: median {cpt * 1000:8.1f} ms (min {min(times['cpt']) * 1000:.1f})")
    print(f" KD iteration: median {kd * 1000:8.1f} ms (min {min(times['kd']) * 1000:.1f})")
    print(
        f"KD / CPT measured {measured:.3f}, predicted (6Ns + 2Nt) / 6Ns = {predicted:.3f}, "
        f"measured / predicted = {measured / predicted:.3f} (target <= 1.10)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
