"""Cost of distillation over continued pre-training: KD from the online teacher and KD from a teacher cache vs CPT.

    python benchmarks/distill_overhead.py                    # CPU defaults below
    python benchmarks/distill_overhead.py --pairs 20 --seq-length 512
    python benchmarks/distill_overhead.py --cache-dir CACHE  # also: reading rows from a cache on disk

All iterations go through the path ``pretrain_ddk.py`` uses (DistillationModel, megatron-core DDP,
``get_forward_backward_func``, the Megatron optimizer, ``forward_step``/``loss_func``), in one process,
on the same batch, three modes:

- CPT: the teacher switched off (``run_teacher = False``, KD weight 0);
- KD online: student forward + backward + teacher forward (no_grad, eval) + the full KD loss;
- KD cache: no teacher forward; the batch carries the teacher's cached top-k fields (``TEACHER_FIELDS``)
  and the sparse KD loss runs. The fields are computed once from the teacher by the cache tool's own
  code (``tools/cache_teacher_logits.py``: ``teacher_rows``), cast to the shard's dtypes and stacked
  as ``CachedTeacherBatches`` does (``teacher_source.stack_rows``).

They alternate (the order rotates every round) so that all see the same machine load; the medians
are compared, of wall-clock time and of this process's CPU time (``time.process_time``: on a machine
shared with other jobs, the CPU time of a one-thread run (``--threads 1``, the default) is the work
itself, while wall time also counts the waiting). With ``--cache-dir`` (a cache built by the tool) each round also times what
``CachedTeacher.rows`` does per iteration on that cache: look up the rows of
``num_microbatches x micro_batch_size`` random cached samples in the memory-mapped shards, check a
fingerprint per row and stack them; printed as a share of the cache iteration.

Prediction from FLOPs: a training iteration costs ~6 N_s per token (forward 2 N_s, backward 4 N_s), the
teacher's forward 2 N_t, so KD / CPT = (6 N_s + 2 N_t) / (6 N_s). N counts the weights used in matrix
multiplications (layers and output layer; the input embedding is a lookup), plus the attention
score/value products (2 x seq x heads x head_dim per layer) so that short and long sequences are
predicted alike. Targets: KD online measured / predicted <= 1.10; KD cache / CPT <= 1.10.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))  # the cache tool's own extraction code


def matmul_weights_per_token(cfg, seq: int, vocab: int) -> float:
    """N: forward FLOPs per token / 2 (layers' GEMMs + attention products + output layer)."""
    attention = 2 * seq * cfg.num_attention_heads * cfg.head_dim
    return cfg.num_layers * (cfg.layer_matmul_parameters() + attention) + cfg.hidden_size * vocab


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The student, teacher and batch shape flags (shared with ``cache_build_speed.py``)."""
    parser.add_argument("--student", default="4,256,4,704", help="layers,hidden,heads,ffn")
    parser.add_argument("--teacher", default="8,384,6,1024", help="layers,hidden,heads,ffn")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--num-microbatches", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=32, help="k of the cached teacher rows")
    parser.add_argument("--tail-samples", type=int, default=0, help="tail samples of the cached rows")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time = work)")


class Clock:
    """Wall-clock and CPU time (this process, all threads) of a block: ``with Clock() as c: ...; c.wall, c.cpu``."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def medians(samples: list[Clock]) -> tuple[float, float]:
    """(median wall, median CPU) seconds."""
    return statistics.median(c.wall for c in samples), statistics.median(c.cpu for c in samples)


def setup_process(threads: int):
    """One process, world size 1: the process groups (``pg``) every model and step takes."""
    import torch

    from megatron_ddk.platform.distributed import ParallelLayout, initialize, set_seed
    from megatron_ddk.platform.startup import prepare_process

    prepare_process()
    torch.set_num_threads(threads)
    pg = initialize(ParallelLayout(world_size=1))
    set_seed(1234, pg)
    return pg


def build_model(spec: str, args, pg, recompute=None):
    """A randomly initialised GPT (``layers,hidden,heads,ffn``) as ``pretrain_ddk.py`` builds it
    (``args.vocab``, ``args.seq_length``; ``recompute``: a ``RecomputeConfig`` or None)."""
    from megatron_ddk.config import ModelConfig, ParallelConfig, PrecisionConfig
    from megatron_ddk.data.tokenizer import padded_vocab_size
    from megatron_ddk.models.gpt import build_gpt_model

    layers, hidden, heads, ffn = map(int, spec.split(","))
    cfg = ModelConfig(
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
    model = build_gpt_model(
        cfg,
        ParallelConfig(),
        PrecisionConfig(),
        pre_process=True,
        post_process=True,
        recompute=recompute,
        padded_vocab_size=padded_vocab_size(args.vocab, 1),
        pg=pg,
    )
    return cfg, model


def random_samples(count: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    """``count`` GPTDataset-like samples (tokens, labels, loss_mask, position_ids [s]) of random tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        tokens = rng.integers(0, vocab, seq + 1, dtype=np.int64)
        samples.append(
            {
                "tokens": tokens[:-1],
                "labels": tokens[1:],
                "loss_mask": np.ones(seq, dtype=np.float32),
                "position_ids": np.arange(seq, dtype=np.int64),
            }
        )
    return samples


def tool_args(args) -> argparse.Namespace:
    """What the cache tool's ``teacher_rows`` reads from its command line."""
    return argparse.Namespace(
        top_k=args.top_k,
        tail_samples=args.tail_samples,
        kd_temperature=1.0,
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
    )


def cached_fields(teacher, samples: list[dict], args, pg) -> dict:
    """``TEACHER_FIELDS`` of ``samples`` as a training run gets them from a cache: the tool's rows, in the
    shard's dtypes, stacked by ``teacher_source.stack_rows``."""
    import cache_teacher_logits as tool
    import numpy as np

    from megatron_ddk.distill.teacher_cache import CacheLayout
    from megatron_ddk.distill.teacher_source import stack_rows

    arrays = tool.teacher_rows(
        teacher, samples, np.arange(len(samples)), args=tool_args(args), vocab_size=args.vocab, pg=pg
    )
    layout = CacheLayout.for_vocabulary(
        seq_length=args.seq_length, top_k=args.top_k, vocab_size=args.vocab, tail_samples=args.tail_samples
    )
    dtypes = {name: dtype for name, dtype, _ in layout.fields()}
    rows = [{name: arrays[name][i].astype(dtypes[name]) for name in dtypes} for i in range(len(samples))]
    return stack_rows(rows)


class RowLookup:
    """What ``CachedTeacher.rows`` does for one iteration, on a cache built by the tool: row lookup in the
    memory-mapped shards, a fingerprint per row (of random tokens of the cache's length) and the stacking."""

    def __init__(self, directory: str, rows_per_iteration: int, micro_batch_size: int):
        import numpy as np

        from megatron_ddk.distill.teacher_cache import TeacherCache

        self.cache = TeacherCache(directory)
        self.samples = []  # (domain, sample id) of every cached training sample
        for key, plan in self.cache.index["plans"].items():
            split, domain = key.split("-d")
            if split == "train":
                ids = np.load(self.cache.directory / plan["file"], allow_pickle=False)
                located = self.cache.locate("train", int(domain), ids)[0] >= 0
                self.samples += [(int(domain), int(i)) for i in ids[located]]
        self.rows, self.mbs = rows_per_iteration, micro_batch_size
        self.rng = np.random.default_rng(0)
        seq = self.cache.layout.seq_length
        self.tokens = self.rng.integers(0, 1 << 15, (micro_batch_size, seq + 1))

    def iteration(self) -> Clock:
        from megatron_ddk.distill.teacher_cache import sample_fingerprint
        from megatron_ddk.distill.teacher_source import stack_rows

        picks = self.rng.choice(len(self.samples), self.rows, replace=len(self.samples) < self.rows)
        with Clock() as clock:
            for first in range(0, self.rows, self.mbs):
                found = []
                for j, pick in enumerate(picks[first : first + self.mbs]):
                    domain, sample = self.samples[pick]
                    found.append(self.cache.row("train", domain, sample))
                    sample_fingerprint(self.tokens[j, :-1], self.tokens[j, 1:])
                stack_rows(found)
        return clock


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--kd-chunk-size", type=int, default=None, help="default: the trainer's default")
    parser.add_argument("--warmup", type=int, default=2, help="rounds not timed")
    parser.add_argument("--pairs", type=int, default=10, help="timed rounds (one iteration of each mode)")
    parser.add_argument(
        "--cache-dir", default=None, help="a cache built by the tool: also time its row lookup"
    )
    args = parser.parse_args()

    import torch
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ddk.data.loader import collate
    from megatron_ddk.distill.model import DistillationModel
    from megatron_ddk.platform.distributed import destroy
    from megatron_ddk.training.step import LossSettings, forward_step

    pg = setup_process(args.threads)
    s_cfg, student = build_model(args.student, args, pg)
    t_cfg, teacher = build_model(args.teacher, args, pg)
    build = dict(pre_process=True, post_process=True)
    wrapper = DistillationModel(student, teacher, **build)
    ddp = DistributedDataParallel(
        student.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), wrapper
    )
    student.config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-5, clip_grad=1.0), [ddp])
    student.config.grad_scale_func = optimizer.scale_loss
    kd = LossSettings(num_domains=1, vocab_size=args.vocab, kd_weight=0.2, kd_chunk_size=args.kd_chunk_size)
    settings = {
        "kd online": kd,
        "kd cache": replace(kd, cache_tail_samples=args.tail_samples),
        "cpt": LossSettings(num_domains=1, vocab_size=args.vocab),
    }
    mbs, seq = args.micro_batch_size, args.seq_length
    samples = random_samples(mbs, seq, args.vocab)
    batch = collate(samples)
    batch["domain_id"] = torch.zeros(mbs, dtype=torch.long)
    batches = {
        "cpt": batch,
        "kd online": batch,
        "kd cache": {**batch, **cached_fields(teacher, samples, args, pg)},
    }
    lookup = RowLookup(args.cache_dir, args.num_microbatches * mbs, mbs) if args.cache_dir else None
    fb = get_forward_backward_func()

    def iteration(mode: str) -> Clock:
        wrapper.run_teacher = mode == "kd online"
        data = iter([batches[mode]] * args.num_microbatches)
        with Clock() as clock:
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
        return clock

    modes = ["cpt", "kd online", "kd cache"]
    times = {mode: [] for mode in modes + ["lookup"]}
    for round_ in range(args.warmup + args.pairs):
        order = modes[round_ % 3 :] + modes[: round_ % 3]
        for mode in order:
            clock = iteration(mode)
            if round_ >= args.warmup:
                times[mode].append(clock)
        if lookup is not None:
            clock = lookup.iteration()
            if round_ >= args.warmup:
                times["lookup"].append(clock)
    destroy()

    n_s, n_t = (
        matmul_weights_per_token(s_cfg, seq, args.vocab),
        matmul_weights_per_token(t_cfg, seq, args.vocab),
    )
    predicted = (6 * n_s + 2 * n_t) / (6 * n_s)
    med = {mode: medians(values) for mode, values in times.items() if values}
    print(
        f"student {args.student} (N_s {n_s / 1e6:.1f}M per token), teacher {args.teacher} "
        f"(N_t {n_t / 1e6:.1f}M), vocab {args.vocab}, seq {seq}, {args.num_microbatches} x {mbs} sequences, "
        f"k {args.top_k} + {args.tail_samples} tail samples, torch threads {torch.get_num_threads()}, {args.pairs} timed rounds"
    )
    for mode in modes:
        wall, cpu = med[mode]
        print(f"{mode:>10} iteration: median wall {wall * 1000:8.1f} ms | CPU {cpu * 1000:8.1f} ms")
    for what, column in (("wall", 0), ("CPU", 1)):
        cache, online, cpt = (med[m][column] for m in ("kd cache", "kd online", "cpt"))
        print(
            f"{what:>4}: KD cache / CPT {cache / cpt:.3f} (target <= 1.10) | KD online / CPT {online / cpt:.3f} "
            f"(predicted (6Ns + 2Nt) / 6Ns = {predicted:.3f}) | KD cache / KD online {cache / online:.3f}"
        )
    if lookup is not None:
        layout = lookup.cache.layout
        wall, cpu = med["lookup"]
        print(
            f"row lookup ({args.cache_dir}: seq {layout.seq_length}, k {layout.top_k}, {len(lookup.samples)} "
            f"cached samples): {lookup.rows} rows per iteration, median wall {wall * 1000:.2f} ms | CPU "
            f"{cpu * 1000:.2f} ms = {100 * cpu / med['kd cache'][1]:.2f}% of a KD cache iteration's CPU time"
            + (
                ""
                if (layout.seq_length, layout.top_k) == (seq, args.top_k)
                else " (another seq / k than the run)"
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
