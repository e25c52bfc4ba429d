"""The command line: Megatron flag names map onto typed configs; every bad combination is named at once."""

from __future__ import annotations

import pytest

from megatron_ddk.arguments import ArgumentError, build_parser, parse_run_config
from megatron_ddk.config import ModelConfig

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--train-iters", "10", "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", "tok.model", "--domains", "d.yaml"]


def parse(*extra, world_size=1):
    return parse_run_config([*BASE, *extra], vocab_size=1000, world_size=world_size)


def test_megatron_flags_fill_the_typed_configs():
    cfg = parse("--ddk-mode", "cpt", "--num-query-groups", "2", "--swiglu", "--disable-bias-linear",
                "--tensor-model-parallel-size", "2", "--global-batch-size", "8", "--bf16", "--lr", "1e-4",
                "--lr-decay-style", "cosine", "--save", "out", "--save-interval", "5", world_size=4)
    assert cfg.model.num_query_groups == 2 and cfg.model.swiglu and not cfg.model.add_bias_linear
    assert cfg.model.vocab_size == 1000 and cfg.model.ffn_hidden_size == 256 and cfg.model.max_position_embeddings == 32
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.precision.bf16
    assert cfg.training.global_batch_size == 8 and cfg.training.lr == 1e-4
    assert cfg.checkpoint.save == "out" and cfg.checkpoint.save_interval == 5
    assert cfg.distill.mode == "cpt" and not cfg.distill.uses_teacher


def test_paper_defaults():
    cfg = parse("--teacher-load", "t")
    assert cfg.distill.mode == "ddk" and cfg.distill.kd_weight == 0.2 and cfg.distill.kd_temperature == 1.0
    assert cfg.distill.kd_loss_type == "forward_kl"
    assert cfg.ddk.interval == 1000 and cfg.ddk.alpha == 0.5 and cfg.ddk.val_samples == 500 and cfg.ddk.mixing == "ddk"
    assert cfg.training.global_batch_size == 2  # micro batch x DP when not given


def test_every_problem_is_reported_at_once():
    with pytest.raises(ArgumentError) as err:
        parse("--tensor-model-parallel-size", "3", "--ddk-alpha", "1.5", "--kd-temperature", "0",
              "--num-layers-per-virtual-pipeline-stage", "1", world_size=2)
    lines = str(err.value).splitlines()
    assert any("--tensor-model-parallel-size 3" in line for line in lines)
    assert any("--ddk-alpha" in line for line in lines)
    assert any("--kd-temperature" in line for line in lines)
    assert any("interleaved" in line for line in lines)
    assert any("--teacher-load" in line for line in lines)  # ddk mode without a teacher


@pytest.mark.parametrize("extra,needle", [
    (["--ddk-mode", "cpt", "--global-batch-size", "3"], "--global-batch-size 3"),
    (["--ddk-mode", "cpt", "--pipeline-model-parallel-size", "3"], "--num-layers 4 is not divisible"),
    (["--ddk-mode", "cpt", "--teacher-load", "t"], "--ddk-mode cpt trains without a teacher"),
    (["--ddk-mode", "cpt", "--fp16"], "--fp16"),
    (["--ddk-mode", "cpt", "--fp8-format", "hybrid"], "--fp8-format needs --bf16"),
    (["--ddk-mode", "cpt", "--save-interval", "3"], "--save-interval needs --save"),
    (["--ddk-mode", "cpt", "--num-query-groups", "3"], "--num-query-groups 3"),
    (["--ddk-mode", "cpt", "--lr-warmup-iters", "10"], "--lr-warmup-iters 10"),
    (["--ddk-mode", "cpt", "--ddk-temperature", "0"], "--ddk-temperature must be > 0"),
    (["--ddk-mode", "cpt", "--ddk-max-step", "1.5"], "--ddk-max-step must be in"),
])
def test_bad_combinations(extra, needle):
    with pytest.raises(ArgumentError, match=needle.replace("(", r"\(")):
        parse(*extra, world_size=3 if "--pipeline-model-parallel-size" in extra else 1)


def test_no_data_is_an_error():
    argv = [a for a in BASE if a not in ("--domains", "d.yaml")] + ["--ddk-mode", "cpt"]
    with pytest.raises(ArgumentError, match="no data"):
        parse_run_config(argv, vocab_size=100)


def test_model_config_round_trips_and_counts_parameters():
    cfg = ModelConfig(num_layers=22, hidden_size=2048, num_attention_heads=32, num_query_groups=4,
                      ffn_hidden_size=5632, vocab_size=32000, max_position_embeddings=2048)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert abs(cfg.num_parameters() - 1_100_048_384) / 1.1e9 < 0.001  # TinyLlama-1.1B
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "mystery": 1})
    with pytest.raises(ValueError, match="--num-query-groups 3"):
        ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=3, ffn_hidden_size=8,
                    vocab_size=10, max_position_embeddings=8)


def test_parser_help_lists_megatron_names():
    text = build_parser().format_help()
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--num-query-groups",
                 "--lr-warmup-iters", "--lr-decay-style", "--tensorboard-dir", "--kd-weight", "--ddk-interval"):
        assert flag in text


def test_mixing_modes_and_their_parameters():
    cfg = parse("--ddk-mode", "cpt", "--ddk-mixing", "ddk-robust", "--ddk-temperature", "2", "--ddk-max-step", "0.1")
    assert (cfg.ddk.mixing, cfg.ddk.temperature, cfg.ddk.max_step) == ("ddk-robust", 2.0, 0.1)
    with pytest.raises(SystemExit):  # argparse: unknown --ddk-mixing choice
        parse("--ddk-mode", "cpt", "--ddk-mixing", "greedy")
