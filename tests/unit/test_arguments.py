"""The command line: Megatron flag names map onto typed configs; every bad combination is named at once."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from megatron_ddk.arguments import CONFIG_GROUPS, ArgumentError, build_parser, flag_of, parse_run_config
from megatron_ddk.config import ModelConfig
from tests.helpers import MINIMAL_RUN_FLAGS

GOLDEN_HELP = Path(__file__).parent / "golden" / "pretrain_ddk_help.txt"
"""The whole flag interface. After a deliberate change, regenerate it with
``MEGATRON_DDK_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_arguments.py`` and review the diff."""

BASE = MINIMAL_RUN_FLAGS


def parse(*extra, world_size=1):
    return parse_run_config([*BASE, *extra], vocab_size=1000, world_size=world_size)


def test_megatron_flags_fill_the_typed_configs():
    cfg = parse(
        "--ddk-mode",
        "cpt",
        "--num-query-groups",
        "2",
        "--swiglu",
        "--disable-bias-linear",
        "--tensor-model-parallel-size",
        "2",
        "--global-batch-size",
        "8",
        "--bf16",
        "--lr",
        "1e-4",
        "--lr-decay-style",
        "cosine",
        "--save",
        "out",
        "--save-interval",
        "5",
        world_size=4,
    )
    assert cfg.model.num_query_groups == 2 and cfg.model.swiglu and not cfg.model.add_bias_linear
    assert (
        cfg.model.vocab_size == 1000
        and cfg.model.ffn_hidden_size == 256
        and cfg.model.max_position_embeddings == 32
    )
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.precision.bf16
    assert cfg.training.global_batch_size == 8 and cfg.training.lr == 1e-4
    assert cfg.checkpoint.save == "out" and cfg.checkpoint.save_interval == 5
    assert cfg.distill.mode == "cpt" and not cfg.distill.uses_teacher


def test_paper_defaults():
    cfg = parse("--teacher-load", "t")
    assert cfg.distill.mode == "ddk" and cfg.distill.kd_weight == 0.2 and cfg.distill.kd_temperature == 1.0
    assert cfg.distill.kd_loss_type == "forward_kl"
    assert (
        cfg.ddk.interval == 1000
        and cfg.ddk.alpha == 0.5
        and cfg.ddk.val_samples == 500
        and cfg.ddk.mixing == "ddk"
    )
    assert cfg.training.global_batch_size == 2  # micro batch x DP when not given


def test_every_problem_is_reported_at_once():
    with pytest.raises(ArgumentError) as err:
        parse(
            "--tensor-model-parallel-size",
            "3",
            "--ddk-alpha",
            "1.5",
            "--kd-temperature",
            "0",
            "--num-layers-per-virtual-pipeline-stage",
            "1",
            world_size=2,
        )
    lines = str(err.value).splitlines()
    assert any("--tensor-model-parallel-size 3" in line for line in lines)
    assert any("--ddk-alpha" in line for line in lines)
    assert any("--kd-temperature" in line for line in lines)
    assert any("interleaved" in line for line in lines)
    assert any("--teacher-load" in line for line in lines)  # ddk mode without a teacher


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--ddk-mode", "cpt", "--global-batch-size", "3"], "--global-batch-size 3"),
        (["--ddk-mode", "cpt", "--pipeline-model-parallel-size", "3"], "--num-layers 4 is not divisible"),
        (["--ddk-mode", "cpt", "--teacher-load", "t"], "--ddk-mode cpt trains without a teacher"),
        (
            ["--ddk-mode", "kd", "--teacher-load", "t", "--teacher-cache-verify", "sizes-only"],
            "--teacher-cache-verify sizes-only needs --teacher-cache",
        ),
        (["--ddk-mode", "cpt", "--fp16"], "--fp16"),
        (["--ddk-mode", "cpt", "--fp8-format", "hybrid"], "--fp8-format needs --bf16"),
        (["--ddk-mode", "cpt", "--save-interval", "3"], "--save-interval needs --save"),
        (["--ddk-mode", "cpt", "--async-save"], "--async-save needs --save"),
        (["--ddk-mode", "cpt", "--num-query-groups", "3"], "--num-query-groups 3"),
        (["--ddk-mode", "cpt", "--lr-warmup-iters", "10"], "--lr-warmup-iters 10"),
        (["--ddk-mode", "cpt", "--ddk-temperature", "0"], "--ddk-temperature must be > 0"),
        (["--ddk-mode", "cpt", "--ddk-max-step", "1.5"], "--ddk-max-step must be in"),
        (["--ddk-mode", "kd", "--teacher-load", "t", "--ddk-signal", "kd-gap"], "--ddk-signal kd-gap steers"),
        (
            ["--ddk-mode", "ddk", "--teacher-load", "t", "--ddk-signal", "kd-gap", "--ddk-mixing", "static"],
            "--ddk-mixing static",
        ),
    ],
)
def test_bad_combinations(extra, needle):
    with pytest.raises(ArgumentError, match=needle.replace("(", r"\(")):
        parse(*extra, world_size=3 if "--pipeline-model-parallel-size" in extra else 1)


def test_no_data_is_an_error():
    argv = [a for a in BASE if a not in ("--domains", "d.yaml")] + ["--ddk-mode", "cpt"]
    with pytest.raises(ArgumentError, match="no data"):
        parse_run_config(argv, vocab_size=100)


def test_model_config_round_trips_and_counts_parameters():
    cfg = ModelConfig(
        num_layers=22,
        hidden_size=2048,
        num_attention_heads=32,
        num_query_groups=4,
        ffn_hidden_size=5632,
        vocab_size=32000,
        max_position_embeddings=2048,
    )
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert abs(cfg.num_parameters() - 1_100_048_384) / 1.1e9 < 0.001  # TinyLlama-1.1B
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "mystery": 1})
    with pytest.raises(ValueError, match="--num-query-groups 3"):
        ModelConfig(
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            num_query_groups=3,
            ffn_hidden_size=8,
            vocab_size=10,
            max_position_embeddings=8,
        )


def test_parser_help_lists_megatron_names():
    text = build_parser().format_help()
    for flag in (
        "--tensor-model-parallel-size",
        "--pipeline-model-parallel-size",
        "--num-query-groups",
        "--lr-warmup-iters",
        "--lr-decay-style",
        "--tensorboard-dir",
        "--kd-weight",
        "--ddk-interval",
    ):
        assert flag in text


def test_help_is_the_golden_file(monkeypatch):
    """Every flag, default and help text is frozen: a change to the interface must be deliberate."""
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal width
    text = build_parser().format_help()
    if os.environ.get("MEGATRON_DDK_UPDATE_GOLDEN"):
        GOLDEN_HELP.parent.mkdir(exist_ok=True)
        GOLDEN_HELP.write_text(text)
    assert text == GOLDEN_HELP.read_text(), (
        f"--help changed; if on purpose, regenerate {GOLDEN_HELP} (see its test)"
    )


def test_each_config_field_declares_its_help_and_flag():
    """The dataclasses are the single source: each field documents itself and maps to one flag (or is derived)."""
    parser_flags = {s for action in build_parser()._actions for s in action.option_strings}
    seen = set()
    for _, cls, prefix in CONFIG_GROUPS:
        for field in dataclasses.fields(cls):
            assert field.metadata.get("help"), f"{cls.__name__}.{field.name} has no help text"
            flag = flag_of(field, prefix)
            if flag is not None:
                assert flag in parser_flags and flag not in seen, (cls.__name__, field.name, flag)
                seen.add(flag)
    derived = [
        f.name for _, cls, p in CONFIG_GROUPS for f in dataclasses.fields(cls) if flag_of(f, p) is None
    ]
    assert derived == ["vocab_size"]  # from the tokenizer


def test_flag_defaults_are_the_field_defaults():
    """Without flags, each config field gets its own default (or the documented flag default)."""
    cfg = parse("--ddk-mode", "cpt")
    parts = {type(getattr(cfg, f.name)): getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for _, cls, _ in CONFIG_GROUPS:
        part = parts[cls]
        for field in dataclasses.fields(cls):
            flag_default = field.metadata["flag_default"]
            required = field.metadata["parser"].get("required")
            if required or field.default is dataclasses.MISSING and flag_default is dataclasses.MISSING:
                continue  # required flag
            if flag_default is not dataclasses.MISSING or field.name in (
                "add_bias_linear",
                "mode",
                "domains",
            ):
                continue  # derived or given (checked in test_megatron_flags_fill_the_typed_configs)
            assert getattr(part, field.name) == field.default, (cls.__name__, field.name)


def test_rope_scaling_and_moe_flags_fill_the_model_config():
    cfg = parse(
        "--ddk-mode",
        "cpt",
        "--use-rope-scaling",
        "--rope-scaling-factor",
        "32",
        "--num-experts",
        "4",
        "--moe-router-topk",
        "1",
        "--moe-router-pre-softmax",
        "--moe-ffn-hidden-size",
        "48",
        "--moe-shared-expert-intermediate-size",
        "96",
        "--moe-shared-expert-gate",
        "--disable-bias-linear",
        "--moe-aux-loss-coeff",
        "0.01",
        "--expert-model-parallel-size",
        "2",
        world_size=2,
    )
    model = cfg.model
    assert model.use_rope_scaling and model.rope_scaling_factor == 32.0
    assert (
        model.rope_scaling_original_max_position_embeddings == 8192
    )  # Llama 3.x's, megatron-core's fixed value
    assert (model.num_experts, model.moe_router_topk, model.expert_ffn_hidden_size) == (4, 1, 48)
    assert model.moe_shared_expert_gate and model.moe_aux_loss_coeff == 0.01 and model.is_moe
    assert cfg.parallel.expert_model_parallel_size == 2


@pytest.mark.parametrize(
    "extra,world_size,needle",
    [
        (
            ["--expert-model-parallel-size", "2"],
            1,
            "--expert-model-parallel-size 2 x --tensor-model-parallel-size 1 x --pipeline-model-parallel-size 1 must divide",
        ),
        (
            ["--expert-model-parallel-size", "2", "--num-experts", "3", "--disable-bias-linear"],
            2,
            "--expert-model-parallel-size 2 does not divide --num-experts 3",
        ),
    ],
)
def test_expert_parallel_layout_is_checked_before_any_process_group(extra, world_size, needle):
    with pytest.raises(ArgumentError, match=needle):
        parse("--ddk-mode", "cpt", *extra, world_size=world_size)


@pytest.mark.parametrize(
    "values,needle",
    [
        (dict(num_experts=4, moe_router_topk=1), "--moe-router-topk 1 needs --moe-router-pre-softmax"),
        (dict(num_experts=4, moe_router_topk=5), "--moe-router-topk 5 must be between 1 and --num-experts 4"),
        (dict(num_experts=4, add_bias_linear=True), "--num-experts needs --disable-bias-linear"),
        (dict(moe_shared_expert_intermediate_size=8), "needs --num-experts"),
        (dict(use_rope_scaling=True, rope_scaling_factor=0.5), "--rope-scaling-factor 0.5 must be >= 1"),
    ],
)
def test_model_config_refuses_inconsistent_moe_and_rope_values(values, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig(
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            ffn_hidden_size=128,
            vocab_size=100,
            max_position_embeddings=32,
            **values,
        )


def test_teacher_experts_not_divisible_by_ep_and_layout_products():
    from megatron_ddk.config import ParallelConfig
    from megatron_ddk.models.gpt import expert_parallel_problem
    from megatron_ddk.platform.distributed import ParallelLayout

    teacher = ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        vocab_size=100,
        max_position_embeddings=32,
        num_experts=6,
        add_bias_linear=False,
    )
    assert expert_parallel_problem(teacher, ParallelConfig(expert_model_parallel_size=4), role="teacher") == (
        "--expert-model-parallel-size 4 does not divide the teacher's 6 experts; choose an EP size that divides "
        "the expert count"
    )
    assert expert_parallel_problem(teacher, ParallelConfig(expert_model_parallel_size=3)) is None
    with pytest.raises(ValueError, match="not divisible by --expert-model-parallel-size"):
        ParallelLayout(world_size=4, tensor_model_parallel_size=2, expert_model_parallel_size=4)
    assert ParallelLayout(world_size=8, tensor_model_parallel_size=2, expert_model_parallel_size=4).ep_enabled


def test_mixing_modes_and_their_parameters():
    cfg = parse(
        "--ddk-mode", "cpt", "--ddk-mixing", "ddk-robust", "--ddk-temperature", "2", "--ddk-max-step", "0.1"
    )
    assert (cfg.ddk.mixing, cfg.ddk.temperature, cfg.ddk.max_step) == ("ddk-robust", 2.0, 0.1)
    with pytest.raises(SystemExit):  # argparse: unknown --ddk-mixing choice
        parse("--ddk-mode", "cpt", "--ddk-mixing", "greedy")
    cfg = parse(
        "--ddk-mode", "ddk", "--teacher-load", "t", "--ddk-mixing", "ddk-log", "--ddk-signal", "kd-gap"
    )
    assert cfg.ddk.signal == "kd-gap"
    assert parse("--ddk-mode", "cpt").ddk.signal == "ppl-ratio"  # the paper's signal by default
    with pytest.raises(SystemExit):  # argparse: unknown --ddk-signal choice
        parse("--ddk-mode", "ddk", "--teacher-load", "t", "--ddk-signal", "loss")
