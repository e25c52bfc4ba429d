"""Megatron-LM-compatible command line -> typed ``RunConfig``, generated from the config dataclasses.

Every flag that sets a config field is declared on that field (``config.option``: default, help
text, spelling); ``build_parser`` turns the fields into flags, group by group, so a default or a help
text exists exactly once. The few flags that set no field (Megatron names we accept or refuse) are
listed in ``_COMPAT_FLAGS``. Flag names and meanings follow Megatron-LM's ``arguments.py`` for
everything it also has; the distillation and DDK flags are ours.

``parse_run`` / ``parse_run_config`` collect every problem (the classes' own ``__post_init__`` checks
and the cross-flag checks below, which need the world size) and raise once (``ArgumentError``), so a
user fixes the command line in one go; they never mutate what they were given. The model's
vocabulary size comes from the tokenizer, not from a flag.

To add a flag: add a field with ``option(default, help=...)`` to the dataclass it configures, then
regenerate the golden help (``MEGATRON_DDK_UPDATE_GOLDEN=1 pytest tests/unit/test_arguments.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from megatron_ddk.config import (
    DYNAMIC_MIXING_MODES,
    CheckpointConfig,
    DataConfig,
    DDKConfig,
    DistillConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    RecomputeConfig,
    RunConfig,
    TrainingConfig,
)
from megatron_ddk.errors import ConfigError
from megatron_ddk.scaling_checks import context_parallel_problems, recompute_problems

if TYPE_CHECKING:
    from megatron_ddk.data.tokenizer import Tokenizer


class ArgumentError(ConfigError, ValueError):
    """The command line is inconsistent; the message lists every problem, one per line."""


# (help group, config class, flag prefix of its fields), in the order of ``--help``
CONFIG_GROUPS: tuple[tuple[str, type, str], ...] = (
    ("model (the student's; the teacher's comes from its checkpoint)", ModelConfig, ""),
    ("parallelism", ParallelConfig, ""),
    (
        "activation recomputation (the student's; the teacher keeps no activations)",
        RecomputeConfig,
        "recompute-",
    ),
    ("precision", PrecisionConfig, ""),
    ("training", TrainingConfig, ""),
    ("checkpointing", CheckpointConfig, ""),
    ("logging and validation", LoggingConfig, ""),
    ("data", DataConfig, ""),
    ("distillation (Eq. 3)", DistillConfig, ""),
    ("DDK domain mixing (Eq. 1-2)", DDKConfig, "ddk-"),
)

# Megatron flags that set no field: accepted for compatibility, or refused with a reason (_check)
_COMPAT_FLAGS: dict[type, tuple[tuple[str, dict[str, Any]], ...]] = {
    ModelConfig: (
        ("--group-query-attention", {"action": "store_true", "help": "accepted for Megatron compatibility"}),
    ),
    ParallelConfig: (
        (
            "--num-layers-per-virtual-pipeline-stage",
            {"type": int, "default": None, "help": "interleaved schedule: not supported (refused)"},
        ),
    ),
    PrecisionConfig: (("--fp16", {"action": "store_true", "help": "not supported (refused); use --bf16"}),),
    TrainingConfig: (
        (
            "--no-check-for-nan-in-loss-and-grad",
            {
                "action": "store_false",
                "dest": "check_for_nan_in_loss_and_grad",
                "help": "do not stop on a non-finite loss or grad norm",
            },
        ),
    ),
}


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def flag_of(config_field: dataclasses.Field, prefix: str = "") -> str | None:
    """The command-line spelling of a config field (None: the field has no flag)."""
    flag = config_field.metadata.get("flag", "")
    if flag is None:
        return None
    return flag or "--" + prefix + config_field.name.replace("_", "-")


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _flag_kwargs(config_field: dataclasses.Field, annotation: Any) -> dict[str, Any]:
    """``add_argument`` keywords of one field: type, default (or required), help, choices, nargs."""
    meta = config_field.metadata
    kwargs: dict[str, Any] = {"help": meta["help"], **meta.get("parser", {})}
    has_default = config_field.default is not dataclasses.MISSING
    default = (
        meta["flag_default"] if meta["flag_default"] is not dataclasses.MISSING else config_field.default
    )
    base = [t for t in typing.get_args(annotation) if t is not type(None)] or [annotation]
    if "action" in kwargs:
        pass  # an explicit action (a switch whose default is on): no type
    elif base[0] is bool:
        if meta.get("flag"):  # a switch named otherwise: --disable-bias-linear (ModelConfig.add_bias_linear)
            kwargs["action"], default = "store_true", False
        elif default is False:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=_bool, metavar="{true,false}")
    elif typing.get_origin(base[0]) is tuple:
        kwargs.setdefault("nargs", "+")
    else:
        kwargs["type"] = base[0] if base[0] in (int, float) else str
    if kwargs.get("required"):
        pass  # a required flag even though the field has a default (for direct construction)
    elif has_default or meta["flag_default"] is not dataclasses.MISSING:
        kwargs["default"] = default
    else:
        kwargs["required"] = True
    return kwargs


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default:" in text or action.required:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``pretrain_ddk.py`` parser, generated from the config dataclasses' fields."""
    parser = argparse.ArgumentParser(
        prog="pretrain_ddk.py",
        description="Distil a teacher GPT into a student with DDK (or run the CPT / KD baselines) on megatron-core.",
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    for title, cls, prefix in CONFIG_GROUPS:
        group = parser.add_argument_group(title)
        hints = typing.get_type_hints(cls)
        for config_field in dataclasses.fields(cls):
            flag = flag_of(config_field, prefix)
            if flag is not None:
                group.add_argument(flag, **_flag_kwargs(config_field, hints[config_field.name]))
        for flag, kwargs in _COMPAT_FLAGS.get(cls, ()):
            group.add_argument(flag, **kwargs)
    return parser


def parse_run(argv: Sequence[str] | None, *, world_size: int = 1) -> tuple[RunConfig, Tokenizer]:
    """Parse and validate the flags, then load ``--tokenizer-model`` once: the model's vocabulary is its size."""
    from megatron_ddk.data.tokenizer import build_tokenizer

    args = build_parser().parse_args(argv)
    _to_config(args, None, world_size)  # every flag problem before the tokenizer file is read
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    return _to_config(args, tokenizer.vocab_size, world_size), tokenizer


def parse_run_config(argv: Sequence[str] | None, *, vocab_size: int, world_size: int = 1) -> RunConfig:
    """Parse and validate with a known tokenizer vocabulary size (no tokenizer file is read)."""
    return _to_config(build_parser().parse_args(argv), vocab_size, world_size)


def _check(args: argparse.Namespace, world_size: int) -> list[str]:
    """What no single config class can check: the world size, and the flags we refuse."""
    problems: list[str] = []
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp >= 1 and pp >= 1 and world_size % (tp * pp):
        problems.append(
            f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} must divide "
            f"the number of processes ({world_size})"
        )
    ep = args.expert_model_parallel_size
    if ep < 1 or (tp >= 1 and pp >= 1 and world_size % (tp * pp * ep)):
        problems.append(
            f"--expert-model-parallel-size {ep} x --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp} must divide the number of processes ({world_size})"
        )
    elif args.num_experts is not None and args.num_experts % ep:
        problems.append(f"--expert-model-parallel-size {ep} does not divide --num-experts {args.num_experts}")
    if pp >= 1 and args.num_layers % pp:
        problems.append(
            f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}"
        )
    if args.num_layers_per_virtual_pipeline_stage is not None:
        problems.append(
            "--num-layers-per-virtual-pipeline-stage: the interleaved pipeline schedule cannot carry the "
            "teacher's hidden states (megatron-core's adjust_tensor_shapes_fn is 1F1B only); drop it"
        )
    if args.fp16:
        problems.append("--fp16 is not supported (no loss scaling here); use --bf16")
    problems += recompute_problems(
        granularity=args.recompute_granularity,
        method=args.recompute_method,
        num_layers=args.recompute_num_layers,
        model_layers=args.num_layers,
        pipeline_size=pp,
    )
    problems += context_parallel_problems(
        context_parallel_size=args.context_parallel_size,
        tensor_size=tp,
        pipeline_size=pp,
        world_size=world_size,
        seq_length=args.seq_length,
    )
    if args.ddk_signal == "kd-gap" and (
        args.ddk_mode != "ddk" or args.ddk_mixing not in DYNAMIC_MIXING_MODES
    ):
        problems.append(
            f"--ddk-signal kd-gap steers DDK's mixture updates, but this run has --ddk-mode {args.ddk_mode} "
            f"--ddk-mixing {args.ddk_mixing}; use --ddk-mode ddk with a dynamic --ddk-mixing "
            f"({', '.join(DYNAMIC_MIXING_MODES)}) or drop --ddk-signal"
        )
    dp = _data_parallel_size(args, world_size)
    gbs = args.global_batch_size or args.micro_batch_size * dp
    if args.micro_batch_size >= 1 and gbs % (args.micro_batch_size * dp):
        problems.append(
            f"--global-batch-size {gbs} must be a multiple of --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {dp}"
        )
    return problems


def _data_parallel_size(args: argparse.Namespace, world_size: int) -> int:
    model_parallel = (
        args.tensor_model_parallel_size
        * args.pipeline_model_parallel_size
        * max(args.context_parallel_size, 1)
    )
    return world_size // model_parallel if model_parallel >= 1 and world_size % model_parallel == 0 else 1


def _to_config(args: argparse.Namespace, vocab_size: int | None, world_size: int) -> RunConfig:
    """Build every config from the flags, collecting the problems of all of them; raise once.

    ``vocab_size=None`` checks the flags only (a placeholder vocabulary; nothing is returned to use).
    """
    problems = _check(args, world_size)
    dp = _data_parallel_size(args, world_size)

    def build(cls: type, prefix: str = "", **derived: Any) -> Any:
        values = {
            f.name: getattr(args, _dest(flag))
            for f in dataclasses.fields(cls)
            if f.name not in derived and (flag := flag_of(f, prefix)) is not None
        }
        try:
            return cls(**values, **derived)
        except ConfigError as err:
            problems.extend(str(err).splitlines())
            return None

    parts: dict[str, Callable[[], Any]] = {
        "model": lambda: build(
            ModelConfig,
            ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size,
            vocab_size=vocab_size or 1,
            max_position_embeddings=args.max_position_embeddings or args.seq_length,
            add_bias_linear=not args.disable_bias_linear,
        ),
        "parallel": lambda: build(ParallelConfig),
        "recompute": lambda: build(RecomputeConfig, prefix="recompute-"),
        "precision": lambda: build(PrecisionConfig),
        "training": lambda: build(
            TrainingConfig, global_batch_size=args.global_batch_size or args.micro_batch_size * dp
        ),
        "checkpoint": lambda: build(CheckpointConfig),
        "logging": lambda: build(LoggingConfig),
        "data": lambda: build(DataConfig, data_path=tuple(args.data_path or ())),
        "distill": lambda: build(DistillConfig),
        "ddk": lambda: build(DDKConfig, prefix="ddk-"),
    }
    built = {name: make() for name, make in parts.items()}
    if problems:
        raise ArgumentError("\n".join(dict.fromkeys(problems)))  # each problem once, in the order found
    return RunConfig(**built)
