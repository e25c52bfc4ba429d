"""Layout rules are checked before any process group, all reported together, with the flags to change."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_ddk.arguments import parse_run_config
from megatron_ddk.config import ModelConfig
from megatron_ddk.errors import ConfigError
from megatron_ddk.layout_checks import check_layout, layout_problems

FLAGS = [
    "--num-layers",
    "4",
    "--hidden-size",
    "96",
    "--num-attention-heads",
    "6",
    "--ffn-hidden-size",
    "240",
    "--seq-length",
    "64",
    "--micro-batch-size",
    "1",
    "--train-iters",
    "1",
    "--tokenizer-type",
    "SentencePieceTokenizer",
    "--tokenizer-model",
    "t.model",
    "--data-path",
    "x",
    "--ddk-mode",
    "cpt",
]


def config(*extra, world_size=1):
    return parse_run_config([*FLAGS, *extra], vocab_size=500, world_size=world_size)


def test_a_good_layout_has_no_problem():
    assert layout_problems(config()) == []
    check_layout(config("--tensor-model-parallel-size", "3", world_size=3))


def test_every_tensor_parallel_rule_is_reported_together():
    problems = layout_problems(config("--tensor-model-parallel-size", "4", world_size=4))
    text = "\n".join(problems)
    assert "--num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4" in text
    assert "--num-query-groups 6 is not divisible by --tensor-model-parallel-size 4" in text
    assert "--ffn-hidden-size" not in text  # 240 % 4 == 0
    assert len(problems) == 2
    with pytest.raises(ConfigError) as err:
        check_layout(config("--tensor-model-parallel-size", "4", world_size=4))
    assert str(err.value).count("\n") == 1


@pytest.mark.parametrize("positions", ["rope", "learned_absolute"])
def test_sequence_longer_than_the_position_table(positions):
    cfg = config("--max-position-embeddings", "32", "--position-embedding-type", positions)
    (problem,) = layout_problems(cfg)
    assert problem.startswith("--seq-length 64 exceeds --max-position-embeddings 32") and positions in problem


def test_teacher_shapes_against_the_runs_layout():
    cfg = config("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", world_size=4)
    teacher = ModelConfig(
        num_layers=3,
        hidden_size=120,
        num_attention_heads=5,
        ffn_hidden_size=301,
        vocab_size=500,
        max_position_embeddings=32,
        num_query_groups=5,
    )
    problems = layout_problems(cfg, teacher, teacher_source="--teacher-load T")
    joined = "\n".join(problems)
    for phrase in (
        "the teacher's (--teacher-load T) num_attention_heads 5 is not divisible by "
        "--tensor-model-parallel-size 2",
        "the teacher's (--teacher-load T) num_query_groups 5",
        "the teacher's (--teacher-load T) ffn_hidden_size 301",
        "the teacher's (--teacher-load T) num_layers 3 is not divisible by --pipeline-model-parallel-size 2",
        "--seq-length 64 exceeds the teacher's (--teacher-load T) max_position_embeddings 32",
    ):
        assert phrase in joined, joined
    assert len(problems) == 5


def test_sequence_parallel_needs_the_sequence_to_split():
    cfg = config("--tensor-model-parallel-size", "3", "--sequence-parallel", world_size=3)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_length=64))
    assert any("needed by --sequence-parallel" in p for p in layout_problems(cfg))
