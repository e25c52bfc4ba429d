"""GPT builder facts: Megatron's vocabulary padding, FP8 refused where it would be silently ignored."""

from __future__ import annotations

import pytest
import torch

from megatron_ddk.config import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_ddk.models.gpt import (
    build_transformer_config,
    check_fp8_supported,
    check_sequence_parallel_supported,
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_fp8_without_transformer_engine_is_an_error():
    with pytest.raises(RuntimeError, match="--fp8-format hybrid needs Transformer Engine"):
        check_fp8_supported(PrecisionConfig(bf16=True, fp8_format="hybrid"))
    check_fp8_supported(PrecisionConfig(bf16=True))  # no FP8 asked: fine
    with pytest.raises(RuntimeError, match="--sequence-parallel needs Transformer Engine"):
        check_sequence_parallel_supported(
            ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
        )


def test_transformer_config_maps_architecture_and_precision():
    model = ModelConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=8,
        num_query_groups=2,
        ffn_hidden_size=176,
        vocab_size=1000,
        max_position_embeddings=128,
        add_qkv_bias=True,
        qk_layernorm=True,
        norm_epsilon=1e-6,
    )
    config = build_transformer_config(
        model, ParallelConfig(tensor_model_parallel_size=1), PrecisionConfig(bf16=True)
    )
    assert (
        config.num_query_groups == 2
        and config.gated_linear_unit
        and config.add_qkv_bias
        and config.qk_layernorm
    )
    assert (
        config.normalization == "RMSNorm" and config.layernorm_epsilon == 1e-6 and not config.add_bias_linear
    )
    assert config.bf16 and config.params_dtype == torch.bfloat16 and config.calculate_per_token_loss
    assert config.fp8 is None
