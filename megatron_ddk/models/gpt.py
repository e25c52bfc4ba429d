"""Build a LLaMA/Qwen-style megatron-core ``GPTModel`` from a ``ModelConfig``.

This is the one place where architecture flags meet megatron-core: the ``TransformerConfig``
(parallel sizes, precision, FP8), the layer spec (Transformer Engine when importable, megatron-core's
local modules otherwise) and the padded vocabulary. Student and teacher are both built here, on the
same parallel state, so their pipeline stages line up.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from megatron_ddk.config import ModelConfig, ParallelConfig, PrecisionConfig, RecomputeConfig, SetupError
from megatron_ddk.errors import ConfigError


@functools.cache
def transformer_engine_available() -> bool:
    """True when a complete Transformer Engine (with its torch extension) imports."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError):  # a half-installed TE raises RuntimeError
        return False
    return True


def uses_transformer_engine() -> bool:
    """Whether models get Transformer Engine's layer spec and fusions: TE importable and a CUDA GPU."""
    return transformer_engine_available() and torch.cuda.is_available()


def check_fp8_supported(precision: PrecisionConfig) -> None:
    """megatron-core silently ignores FP8 without Transformer Engine: refuse it instead."""
    if precision.fp8_format is None:
        return
    if not transformer_engine_available():
        raise SetupError(
            f"--fp8-format {precision.fp8_format} needs Transformer Engine, which is not importable here; "
            "install the project's [gpu] extra (or use the Docker image) or drop --fp8-format"
        )
    if not torch.cuda.is_available():
        raise SetupError(f"--fp8-format {precision.fp8_format} needs a CUDA GPU; drop --fp8-format on CPU")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise SetupError(
            f"--fp8-format {precision.fp8_format} needs an FP8-capable GPU (compute capability >= 8.9, e.g. "
            f"H100); this GPU has {major}.{minor}: drop --fp8-format"
        )


def check_sequence_parallel_supported(parallel: ParallelConfig) -> None:
    """megatron-core's torch norm (local spec) refuses sequence parallelism deep inside the model."""
    if parallel.sequence_parallel and not uses_transformer_engine():
        raise SetupError("--sequence-parallel needs Transformer Engine's norms (GPU with the [gpu] extra); "
                           "drop --sequence-parallel here")


def check_context_parallel_supported(parallel: ParallelConfig) -> None:
    """megatron-core's context parallelism runs only in Transformer Engine's attention; and the KD loss,
    per-domain sums and DDK evaluation are not yet reduced over a CP group: refuse it up front."""
    cp = parallel.context_parallel_size
    if cp == 1:
        return
    if not uses_transformer_engine():
        raise SetupError(f"--context-parallel-size {cp} needs Transformer Engine's attention (GPU with the [gpu] "
                         "extra); use --context-parallel-size 1 here")
    raise SetupError(f"--context-parallel-size {cp}: context parallelism is not supported yet (the KD loss and the "
                     "per-domain statistics are not reduced over the CP group); use --context-parallel-size 1")


def build_transformer_config(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig,
                             *, use_fp8: bool = True, initialize_weights: bool = True,
                             recompute: RecomputeConfig | None = None):
    """megatron-core ``TransformerConfig`` for ``model`` under the run's parallelism and precision.

    ``recompute`` (the student's ``--recompute-*``) maps to megatron-core's ``recompute_*`` fields;
    None (the teacher) recomputes nothing.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if precision.bf16 else torch.float32
    fp8 = {}
    if use_fp8 and precision.fp8_format is not None:
        fp8 = dict(
            fp8=precision.fp8_format,
            fp8_recipe=precision.fp8_recipe,
            fp8_amax_history_len=precision.fp8_amax_history_len,
            fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
        )
    recompute = recompute or RecomputeConfig()
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.kv_channels,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        init_method_std=model.init_method_std,
        attention_dropout=model.attention_dropout,
        hidden_dropout=model.hidden_dropout,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        bf16=precision.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        use_cpu_initialization=not on_gpu,
        perform_initialization=initialize_weights,
        calculate_per_token_loss=True,
        attention_softmax_in_fp32=True,
        bias_activation_fusion=model.swiglu and uses_transformer_engine(),
        masked_softmax_fusion=False,
        bias_dropout_fusion=uses_transformer_engine(),
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        recompute_granularity=recompute.granularity,
        recompute_method=recompute.method,
        recompute_num_layers=recompute.num_layers,
        **fp8,
    )


def layer_spec(model: ModelConfig):
    """Transformer Engine layer spec when TE imports (needed for FP8 and sequence parallel), else local."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if uses_transformer_engine():
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    return get_gpt_layer_local_spec(qk_layernorm=model.qk_layernorm, normalization=model.normalization)


def build_gpt_model(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, *,
                    padded_vocab_size: int, pg, pre_process: bool, post_process: bool, use_fp8: bool = True,
                    initialize_weights: bool = True, recompute: RecomputeConfig | None = None):
    """One pipeline stage of a ``GPTModel`` (the stage given by ``pre_process``/``post_process``).

    ``padded_vocab_size``: embedding/output rows, the tokenizer's vocabulary padded for TP
    (``data.tokenizer.padded_vocab_size``); ``pg``: the ProcessGroupCollection the model's
    collectives run over (``platform.distributed.initialize`` returns it).
    ``initialize_weights=False`` skips the random init (seconds per billion parameters) when the
    weights are about to be loaded anyway. ``recompute``: the student's activation recomputation.
    """
    from megatron.core.models.gpt import GPTModel

    if model.num_layers % parallel.pipeline_model_parallel_size:
        raise ConfigError(
            f"a model with {model.num_layers} layers cannot be split over --pipeline-model-parallel-size "
            f"{parallel.pipeline_model_parallel_size}; choose a PP size that divides the layer count"
        )
    config = build_transformer_config(model, parallel, precision, use_fp8=use_fp8,
                                      initialize_weights=initialize_weights, recompute=recompute)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model),
        vocab_size=padded_vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        rotary_percent=model.rotary_percent,
        rotary_base=model.rotary_base,
        pg_collection=pg,
    )
    if precision.bf16:
        # what megatron's Float16Module does: every parameter in bf16 (the torch norms of the local
        # spec are created in fp32), so the mixed-precision optimizer sees one dtype
        gpt.bfloat16()
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    return gpt
