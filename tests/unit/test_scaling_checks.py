"""Recompute and context-parallel flags: Megatron-LM's meanings, one line per contradiction, before any process group."""

from __future__ import annotations

import pytest

from megatron_ddk.arguments import ArgumentError, parse_run_config
from megatron_ddk.config import ModelConfig, ParallelConfig, PrecisionConfig, RecomputeConfig
from megatron_ddk.models.gpt import build_transformer_config, check_context_parallel_supported
from tests.helpers import MINIMAL_RUN_FLAGS

BASE = [*MINIMAL_RUN_FLAGS, "--ddk-mode", "cpt"]


def parse(*extra, world_size=1):
    return parse_run_config([*BASE, *extra], vocab_size=1000, world_size=world_size)


def problems(*extra, world_size=1) -> list[str]:
    with pytest.raises(ArgumentError) as err:
        parse(*extra, world_size=world_size)
    return str(err.value).splitlines()


def test_recompute_flags_reach_the_student_config_only():
    cfg = parse(
        "--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"
    )
    assert cfg.recompute == RecomputeConfig(granularity="full", method="block", num_layers=2)
    assert parse().recompute == RecomputeConfig() and parse().parallel.context_parallel_size == 1
    model = ModelConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        vocab_size=1000,
        max_position_embeddings=32,
    )
    student = build_transformer_config(model, cfg.parallel, cfg.precision, recompute=cfg.recompute)
    assert (student.recompute_granularity, student.recompute_method, student.recompute_num_layers) == (
        "full",
        "block",
        2,
    )
    teacher = build_transformer_config(model, cfg.parallel, cfg.precision)
    assert teacher.recompute_granularity is None and teacher.recompute_method is None
    selective = build_transformer_config(
        model,
        ParallelConfig(),
        PrecisionConfig(),
        recompute=parse("--recompute-granularity", "selective").recompute,
    )
    assert selective.recompute_granularity == "selective" and selective.recompute_modules == ["core_attn"]


@pytest.mark.parametrize(
    "extra,expected",
    [
        (
            ["--recompute-method", "uniform"],
            ["--recompute-method uniform needs --recompute-granularity full"],
        ),
        (["--recompute-num-layers", "1"], ["--recompute-num-layers 1 needs --recompute-granularity full"]),
        (
            [
                "--recompute-granularity",
                "selective",
                "--recompute-method",
                "block",
                "--recompute-num-layers",
                "1",
            ],
            [
                "--recompute-method and --recompute-num-layers apply to --recompute-granularity full only; drop them "
                "(selective recomputes the core attention of every layer)"
            ],
        ),
        (
            ["--recompute-granularity", "full"],
            [
                "--recompute-granularity full needs --recompute-method uniform or block",
                "--recompute-granularity full needs --recompute-num-layers N, 1 <= N <= 4 (the student's layers per "
                "pipeline stage)",
            ],
        ),
        (
            [
                "--recompute-granularity",
                "full",
                "--recompute-method",
                "uniform",
                "--recompute-num-layers",
                "0",
            ],
            [
                "--recompute-num-layers 0 must be between 1 and the student's 4 layers per pipeline stage "
                "(--num-layers 4 / --pipeline-model-parallel-size 1)"
            ],
        ),
    ],
)
def test_contradictory_recompute_flags(extra, expected):
    assert problems(*extra) == expected


def test_recompute_num_layers_larger_than_layers_per_stage():
    lines = problems(
        "--recompute-granularity",
        "full",
        "--recompute-method",
        "block",
        "--recompute-num-layers",
        "3",
        "--pipeline-model-parallel-size",
        "2",
        world_size=2,
    )
    assert lines == [
        "--recompute-num-layers 3 must be between 1 and the student's 2 layers per pipeline stage "
        "(--num-layers 4 / --pipeline-model-parallel-size 2)"
    ]
    parse(
        "--recompute-granularity",
        "full",
        "--recompute-method",
        "block",
        "--recompute-num-layers",
        "2",
        "--pipeline-model-parallel-size",
        "2",
        world_size=2,
    )


def test_context_parallel_layout_checks():
    assert problems("--context-parallel-size", "3") == [
        "--seq-length 32 must be divisible by 2 x --context-parallel-size 3 = 6 (megatron-core cuts each sequence "
        "into 2 x CP chunks to balance the causal attention)",
        "--tensor-model-parallel-size 1 x --pipeline-model-parallel-size 1 x --context-parallel-size 3 = 3 must "
        "divide the number of processes (1)",
    ]
    assert problems("--context-parallel-size", "2", "--tensor-model-parallel-size", "2", world_size=6) == [
        "--tensor-model-parallel-size 2 x --pipeline-model-parallel-size 1 x --context-parallel-size 2 = 4 must "
        "divide the number of processes (6)"
    ]
    assert problems("--context-parallel-size", "0") == ["--context-parallel-size must be >= 1, got 0"]
    assert parse("--context-parallel-size", "2", world_size=2).parallel.context_parallel_size == 2


def test_context_parallel_splits_data_parallelism():
    """CP ranks of one replica share its samples: DP = world / (TP x PP x CP)."""
    assert problems("--context-parallel-size", "2", "--global-batch-size", "2", world_size=4) == [
        "--global-batch-size 2 must be a multiple of --micro-batch-size 2 x data-parallel size 2"
    ]
    assert parse("--context-parallel-size", "2", "--global-batch-size", "2", world_size=2)


def test_context_parallel_refuses_what_it_does_not_split():
    for dense in (parse().model, parse("--position-embedding-type", "learned_absolute").model):
        check_context_parallel_supported(dense, ParallelConfig(context_parallel_size=2))
    check_context_parallel_supported(
        parse("--num-experts", "4", "--disable-bias-linear").model, ParallelConfig()
    )
    with pytest.raises(
        RuntimeError,
        match=r"^--context-parallel-size 2 is not supported for the teacher's mixture-of-experts layers "
        r"\(not verified under CP here\); use --context-parallel-size 1$",
    ):
        check_context_parallel_supported(
            parse("--num-experts", "4", "--disable-bias-linear").model,
            ParallelConfig(context_parallel_size=2),
            role="teacher",
        )
