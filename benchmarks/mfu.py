"""Model FLOPs utilisation of the DDK distillation step on one GPU: bf16 vs FP8, side by side.

    python benchmarks/mfu.py                           # ~1.1B student, ~3.8B teacher, seq 2048
    python benchmarks/mfu.py --modes bf16-local bf16 fp8 --iters 10

One step = student forward + backward + teacher forward (no grad) + the chunked KD loss, through the
same megatron-core path pretrain_ddk.py uses (DistillationModel, DDP, get_forward_backward_func,
the Megatron optimizer). FLOPs are counted from the model shapes (matmuls incl. attention scores and
the output layer; the backward is twice the forward): per token, forward = 2 * (matmul parameters)
+ 2 * 2 * seq * (attention heads x head dim) per layer (causal attention counted in full, as Megatron
does). MFU = FLOPs / (time x peak): H100 SXM dense peak 989 TFLOP/s bf16 and 1979 TFLOP/s FP8; the
FP8 run's MFU is quoted against the bf16 peak too, so the two columns compare the same work.

Modes: ``bf16-local`` (megatron-core local spec, no Transformer Engine), ``bf16`` (TE spec),
``fp8`` (TE spec, --fp8-format hybrid, delayed scaling; teacher in FP8 too).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}
STUDENT = dict(
    num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=8, ffn_hidden_size=5632
)
TEACHER = dict(
    num_layers=32, hidden_size=3072, num_attention_heads=24, num_query_groups=8, ffn_hidden_size=8192
)


def forward_flops_per_token(cfg, seq: int, vocab: int) -> float:
    attention = 2 * seq * cfg.num_attention_heads * cfg.head_dim  # QK^T and AV, per token
    return 2 * cfg.num_layers * (cfg.layer_matmul_parameters() + attention) + 2 * cfg.hidden_size * vocab


def run_mode(mode: str, args) -> dict:
    import torch

    use_te = mode != "bf16-local"
    if not use_te:
        import megatron_ddk.models.gpt as gpt

        gpt.transformer_engine_available.cache_clear()
        gpt.transformer_engine_available = lambda: False  # force the local spec for this process
    from megatron.core import parallel_state
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
    from megatron_ddk.models.gpt import build_gpt_model, check_fp8_supported, transformer_engine_available
    from megatron_ddk.platform.distributed import ParallelLayout, initialize, set_seed
    from megatron_ddk.training.step import LossSettings, forward_step

    if use_te and not transformer_engine_available():
        return {"mode": mode, "skipped": "Transformer Engine is not importable"}
    pg = initialize(ParallelLayout(world_size=1))
    set_seed(1234, pg)
    precision = PrecisionConfig(
        bf16=True,
        fp8_format="hybrid" if mode == "fp8" else None,
        fp8_recipe="delayed",
        fp8_amax_history_len=1024,
        fp8_amax_compute_algo="max",
    )
    check_fp8_supported(precision)
    common = dict(
        vocab_size=args.vocab,
        max_position_embeddings=args.seq_length,
        untie_embeddings_and_output_weights=True,
    )
    s_cfg, t_cfg = ModelConfig(**STUDENT, **common), ModelConfig(**TEACHER, **common)
    rows = padded_vocab_size(args.vocab, 1, s_cfg.make_vocab_size_divisible_by)
    student = build_gpt_model(
        s_cfg, ParallelConfig(), precision, padded_vocab_size=rows, pg=pg, pre_process=True, post_process=True
    )
    teacher = build_gpt_model(
        t_cfg, ParallelConfig(), precision, padded_vocab_size=rows, pg=pg, pre_process=True, post_process=True
    )
    wrapper = DistillationModel(student, teacher, pre_process=True, post_process=True)
    ddp = DistributedDataParallel(
        student.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), wrapper
    )
    student.config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-5, bf16=True, params_dtype=torch.bfloat16, clip_grad=1.0),
        [ddp],
    )
    student.config.grad_scale_func = optimizer.scale_loss
    settings = LossSettings(
        num_domains=1, vocab_size=args.vocab, kd_weight=0.2, kd_chunk_size=args.kd_chunk_size
    )
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.micro_batch_size, args.seq_length + 1), generator=g)
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(args.micro_batch_size, args.seq_length),
        "position_ids": torch.arange(args.seq_length).expand(args.micro_batch_size, -1),
        "domain_id": torch.zeros(args.micro_batch_size, dtype=torch.long),
    }

    def batches():
        while True:
            yield batch

    data = batches()
    fb = get_forward_backward_func()
    times, losses = [], []
    for it in range(args.warmup + args.iters):
        torch.cuda.synchronize()
        start = time.perf_counter()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reports = fb(
            forward_step_func=partial(forward_step, settings=settings, pg=pg),
            data_iterator=data,
            model=[ddp],
            num_microbatches=args.num_microbatches,
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
            forward_only=False,
        )
        optimizer.step()
        torch.cuda.synchronize()
        if it >= args.warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(sum(r["lm loss"][0] for r in reports) / sum(r["lm loss"][1] for r in reports)))
    tokens_per_step = args.num_microbatches * args.micro_batch_size * args.seq_length
    student_f = forward_flops_per_token(s_cfg, args.seq_length, args.vocab)
    teacher_f = forward_flops_per_token(t_cfg, args.seq_length, args.vocab)
    flops = tokens_per_step * (3 * student_f + teacher_f)
    step = sorted(times)[len(times) // 2]
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), 989e12)
    parallel_state.destroy_model_parallel()
    return {
        "mode": mode,
        "gpu": name,
        "step_s": step,
        "tokens_per_s": tokens_per_step / step,
        "tflops": flops / step / 1e12,
        "mfu_bf16_peak": flops / step / peak,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "student_params": s_cfg.num_parameters(),
        "teacher_params": t_cfg.num_parameters(),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", nargs="+", default=["bf16-local", "bf16", "fp8"])
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--num-microbatches", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--kd-chunk-size", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_mode(args.child, args)), flush=True)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/mfu.py needs a CUDA GPU; nothing to measure here")
        return 0
    results = []
    for mode in args.modes:  # one fresh process per mode: no allocator or TE state shared
        cmd = [sys.executable, __file__, "--child", mode] + [
            a for a in sys.argv[1:] if a not in args.modes and a != "--modes"
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        results.append(json.loads(line[-1][7:]) if line else {"mode": mode, "skipped": proc.stderr[-1500:]})
    print(
        f"distillation step: student {STUDENT} + teacher {TEACHER}, seq {args.seq_length}, "
        f"{args.num_microbatches} x {args.micro_batch_size} sequences/step, vocab {args.vocab}"
    )
    print(
        f"{'mode':>11s} | {'step (s)':>8s} | {'tokens/s':>9s} | {'TFLOP/s':>8s} | {'MFU (bf16 peak)':>15s} | "
        f"{'loss first->last':>17s} | {'mem GiB':>7s}"
    )
    done = {}
    for r in results:
        if "skipped" in r:
            print(
                f"{r['mode']:>11s} | skipped: {r['skipped'].strip().splitlines()[-1] if r['skipped'].strip() else '?'}"
            )
            continue
        done[r["mode"]] = r
        print(
            f"{r['mode']:>11s} | {r['step_s']:8.3f} | {r['tokens_per_s']:9.0f} | {r['tflops']:8.1f} | "
            f"{r['mfu_bf16_peak']:15.1%} | {r['first_loss']:7.3f}->{r['last_loss']:7.3f} | {r['peak_mem_gib']:7.1f}"
        )
    if "fp8" in done and "bf16" in done:
        print(f"FP8 / bf16 (TE) step-time speed-up: {done['bf16']['step_s'] / done['fp8']['step_s']:.2f}x")
    if "bf16" in done and "bf16-local" in done:
        print(f"TE bf16 / local bf16 speed-up: {done['bf16-local']['step_s'] / done['bf16']['step_s']:.2f}x")
    if done:
        print(f"GPU: {next(iter(done.values()))['gpu']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
