"""Megatron-LM-compatible command line -> typed ``RunConfig``.

Flag names and meanings follow Megatron-LM's ``arguments.py`` for everything it also has; the
distillation and DDK flags are ours. ``parse_run`` / ``parse_run_config`` collect every problem they
find and raise once (``ArgumentError``) so a user fixes the command line in one go; they never mutate
what they were given. The model's vocabulary size comes from the tokenizer, not from a flag.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

from megatron_ddk.config import (
    DDK_MODES,
    FP8_FORMATS,
    FP8_RECIPES,
    KD_LOSS_TYPES,
    LR_DECAY_STYLES,
    MIXING_MODES,
    CheckpointConfig,
    DataConfig,
    DDKConfig,
    DistillConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    TrainingConfig,
)
from megatron_ddk.errors import ConfigError

if TYPE_CHECKING:
    from megatron_ddk.data.tokenizer import Tokenizer


class ArgumentError(ConfigError, ValueError):
    """The command line is inconsistent; the message lists every problem, one per line."""


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_ddk.py",
        description="Distil a teacher GPT into a student with DDK (or run the CPT / KD baselines) on megatron-core.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    g = parser.add_argument_group("model (the student's; the teacher's comes from its checkpoint)")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--num-query-groups", type=int, default=None,
                   help="key/value heads (grouped-query attention); implies --group-query-attention")
    g.add_argument("--group-query-attention", action="store_true", help="accepted for Megatron compatibility")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 * hidden size")
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default: --seq-length")
    g.add_argument("--normalization", choices=("RMSNorm", "LayerNorm"), default="RMSNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP (LLaMA/Qwen); default GELU")
    g.add_argument("--position-embedding-type", choices=("rope", "learned_absolute"), default="rope")
    g.add_argument("--rotary-base", type=float, default=10000.0)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--add-qkv-bias", action="store_true")
    g.add_argument("--qk-layernorm", action="store_true")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)

    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved schedule: not supported (refused)")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")

    g = parser.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true", help="not supported (refused); use --bf16")
    g.add_argument("--fp8-format", choices=FP8_FORMATS, default=None)
    g.add_argument("--fp8-recipe", choices=FP8_RECIPES, default="delayed")
    g.add_argument("--fp8-amax-history-len", type=int, default=1024)
    g.add_argument("--fp8-amax-compute-algo", choices=("max", "most_recent"), default="max")

    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data parallel")
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--lr", type=float, default=3e-5)
    g.add_argument("--min-lr", type=float, default=3e-6)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default="cosine")
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save and exit when the iteration is a multiple of this")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM (e.g. SLURM's pre-emption notice), save a checkpoint and exit cleanly")

    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true",
                   help="load only the weights of --load; iteration, optimizer and data start fresh")

    g = parser.add_argument_group("logging and validation")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)

    g = parser.add_argument_group("data")
    g.add_argument("--domains", default=None, help="domain registry (YAML/JSON), see docs/DATA.md")
    g.add_argument("--data-path", nargs="+", default=None, help="Megatron's static form: W1 PREFIX1 W2 PREFIX2 ...")
    g.add_argument("--data-cache-path", default=None, help="where GPTDataset index caches go")
    g.add_argument("--tokenizer-type", choices=("SentencePieceTokenizer", "HuggingFaceTokenizer"), required=True)
    g.add_argument("--tokenizer-model", required=True)

    g = parser.add_argument_group("distillation (Eq. 3)")
    g.add_argument("--ddk-mode", choices=DDK_MODES, default="ddk",
                   help="cpt: student alone; kd: teacher, static mixture; ddk: teacher, dynamic mixture")
    g.add_argument("--teacher-load", default=None)
    g.add_argument("--teacher-bf16", type=_bool, default=None, help="default: follow --bf16")
    g.add_argument("--teacher-fp8", type=_bool, default=True)
    g.add_argument("--kd-loss-type", choices=KD_LOSS_TYPES, default="forward_kl")
    g.add_argument("--kd-temperature", type=float, default=1.0)
    g.add_argument("--kd-weight", type=float, default=0.2, help="gamma: loss = CE + gamma * KD")
    g.add_argument("--kd-jsd-beta", type=float, default=0.5)
    g.add_argument("--kd-chunk-size", type=int, default=None,
                   help="tokens per chunk of the KD loss (default: 16M / vocabulary shard, e.g. 110 for Qwen at TP=1)")

    g = parser.add_argument_group("DDK domain mixing (Eq. 1-2)")
    g.add_argument("--ddk-interval", type=int, default=1000, help="K: iterations between weight updates")
    g.add_argument("--ddk-alpha", type=float, default=0.5)
    g.add_argument("--ddk-val-samples", type=int, default=500, help="validation samples per domain")
    g.add_argument("--ddk-mixing", choices=MIXING_MODES, default="ddk",
                   help="ddk: the paper's Eq. 1/2; ddk-log (ratios in log space): recommended when the ratios "
                        "differ by more than ~1 (docs/DDK.md)")
    g.add_argument("--ddk-temperature", type=float, default=1.0,
                   help="tau of ddk-tempered, ddk-log and ddk-robust: Eq. 1/2's exponent is divided by it")
    g.add_argument("--ddk-max-step", type=float, default=0.25,
                   help="ddk-bounded: the most one update moves the mixture (total variation distance)")
    g.add_argument("--ddk-log-file", default=None, help="JSONL of every update (default <save>/ddk_log.jsonl)")
    return parser


def parse_run(argv: Sequence[str] | None, *, world_size: int = 1) -> tuple[RunConfig, Tokenizer]:
    """Parse and validate the flags, then load ``--tokenizer-model`` once: the model's vocabulary is its size."""
    from megatron_ddk.data.tokenizer import build_tokenizer

    args = _parse_and_check(argv, world_size)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    return _to_config(args, tokenizer.vocab_size, world_size), tokenizer


def parse_run_config(argv: Sequence[str] | None, *, vocab_size: int, world_size: int = 1) -> RunConfig:
    """Parse and validate with a known tokenizer vocabulary size (no tokenizer file is read)."""
    return _to_config(_parse_and_check(argv, world_size), vocab_size, world_size)


def _parse_and_check(argv: Sequence[str] | None, world_size: int) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    problems = _check(args, world_size)
    if problems:
        raise ArgumentError("\n".join(problems))
    return args


def _check(args: argparse.Namespace, world_size: int) -> list[str]:
    problems: list[str] = []
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        problems.append(f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} must divide "
                        f"the number of processes ({world_size})")
        dp = 1
    else:
        dp = world_size // (tp * pp)
    if args.num_layers % max(pp, 1):
        problems.append(f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    if args.num_layers_per_virtual_pipeline_stage is not None:
        problems.append("--num-layers-per-virtual-pipeline-stage: the interleaved pipeline schedule cannot carry the "
                        "teacher's hidden states (megatron-core's adjust_tensor_shapes_fn is 1F1B only); drop it")
    if args.fp16:
        problems.append("--fp16 is not supported (no loss scaling here); use --bf16")
    if args.num_query_groups is not None and args.num_attention_heads % args.num_query_groups:
        problems.append(f"--num-attention-heads {args.num_attention_heads} is not divisible by --num-query-groups "
                        f"{args.num_query_groups}")
    gbs = args.global_batch_size or args.micro_batch_size * dp
    if args.micro_batch_size < 1 or gbs % (args.micro_batch_size * dp):
        problems.append(f"--global-batch-size {gbs} must be a multiple of --micro-batch-size "
                        f"{args.micro_batch_size} x data-parallel size {dp}")
    if args.train_iters < 1:
        problems.append(f"--train-iters must be >= 1, got {args.train_iters}")
    decay = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters >= decay:
        problems.append(f"--lr-warmup-iters {args.lr_warmup_iters} must be smaller than the decay length {decay} "
                        "(--lr-decay-iters, default --train-iters)")
    if args.domains is None and not args.data_path:
        problems.append("no data: give --domains REGISTRY.yaml or --data-path [W1] PREFIX1 [W2 PREFIX2 ...]")
    if args.domains is not None and args.data_path:
        problems.append("give either --domains or --data-path, not both")
    if args.ddk_mode == "cpt" and args.teacher_load:
        problems.append("--teacher-load is given but --ddk-mode cpt trains without a teacher; use --ddk-mode kd or ddk")
    if args.ddk_mode in ("kd", "ddk") and not args.teacher_load:
        problems.append(f"--ddk-mode {args.ddk_mode} needs a teacher: add --teacher-load DIR (or use --ddk-mode cpt)")
    if args.kd_temperature <= 0:
        problems.append(f"--kd-temperature must be > 0, got {args.kd_temperature}")
    if args.kd_weight < 0:
        problems.append(f"--kd-weight must be >= 0, got {args.kd_weight}")
    if not 0.0 <= args.kd_jsd_beta <= 1.0:
        problems.append(f"--kd-jsd-beta must be in [0, 1], got {args.kd_jsd_beta}")
    if args.ddk_interval < 1:
        problems.append(f"--ddk-interval must be >= 1, got {args.ddk_interval}")
    if not 0.0 <= args.ddk_alpha <= 1.0:
        problems.append(f"--ddk-alpha must be in [0, 1], got {args.ddk_alpha}")
    if not args.ddk_temperature > 0:
        problems.append(f"--ddk-temperature must be > 0, got {args.ddk_temperature}")
    if not 0 < args.ddk_max_step <= 1:
        problems.append(f"--ddk-max-step must be in (0, 1], got {args.ddk_max_step}")
    if args.ddk_val_samples < 1:
        problems.append(f"--ddk-val-samples must be >= 1, got {args.ddk_val_samples}")
    if args.save_interval is not None and not args.save:
        problems.append("--save-interval needs --save DIR")
    if args.sequence_parallel and tp == 1:
        problems.append("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        problems.append("--overlap-param-gather needs --use-distributed-optimizer")
    if args.fp8_format is not None and not args.bf16:
        problems.append("--fp8-format needs --bf16 (FP8 GEMMs with bf16 everywhere else)")
    return problems


def _from_flags(cls, args: argparse.Namespace, *, prefix: str = "", **overrides):
    """``cls`` with each field taken from the flag of the same name (``--lr`` -> ``lr``; ``prefix``
    for grouped flags: ``--ddk-alpha`` -> ``DDKConfig.alpha``), except the fields in ``overrides``."""
    values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls) if f.name not in overrides}
    return cls(**values, **overrides)


def _to_config(args: argparse.Namespace, vocab_size: int, world_size: int) -> RunConfig:
    dp = world_size // (args.tensor_model_parallel_size * args.pipeline_model_parallel_size)
    return RunConfig(
        model=_from_flags(
            ModelConfig, args,
            ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size,
            vocab_size=vocab_size,
            max_position_embeddings=args.max_position_embeddings or args.seq_length,
            add_bias_linear=not args.disable_bias_linear,
        ),
        parallel=_from_flags(ParallelConfig, args),
        precision=_from_flags(PrecisionConfig, args),
        training=_from_flags(TrainingConfig, args,
                             global_batch_size=args.global_batch_size or args.micro_batch_size * dp),
        checkpoint=_from_flags(CheckpointConfig, args),
        logging=_from_flags(LoggingConfig, args),
        data=_from_flags(DataConfig, args, data_path=tuple(args.data_path or ())),
        distill=_from_flags(DistillConfig, args, mode=args.ddk_mode),
        ddk=_from_flags(DDKConfig, args, prefix="ddk_"),
    )
