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
        raise SetupError(
            "--sequence-parallel needs Transformer Engine's norms (GPU with the [gpu] extra); "
            "drop --sequence-parallel here"
        )


def check_context_parallel_supported(
    model: ModelConfig, parallel: ParallelConfig, *, role: str = "model"
) -> None:
    """What context parallelism cannot split here, refused before any weight exists.

    With Transformer Engine (GPU) its CP attention runs; without it, ``models.cp_attention`` (the
    all-gather form). megatron-core's MoE layers are not verified under CP here: refused."""
    cp = parallel.context_parallel_size
    if cp == 1:
        return
    if model.is_moe:
        raise SetupError(
            f"--context-parallel-size {cp} is not supported for the {role}'s mixture-of-experts layers "
            "(not verified under CP here); use --context-parallel-size 1"
        )


def build_transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    *,
    use_fp8: bool = True,
    initialize_weights: bool = True,
    recompute: RecomputeConfig | None = None,
):
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
        context_parallel_size=parallel.context_parallel_size,
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
        **moe_transformer_config(model, parallel),
        **fp8,
    )


def moe_transformer_config(model: ModelConfig, parallel: ParallelConfig) -> dict:
    """``TransformerConfig`` fields of an MoE model; none for a dense one (which ignores EP).

    The CPU path uses the all-gather token dispatcher and SequentialMLP experts (the all-to-all
    dispatcher creates CUDA streams); on GPU, all-to-all and Transformer Engine's grouped GEMM.
    Both expert implementations write the same dist_checkpointing keys, so checkpoints move freely.
    """
    if not model.is_moe:
        return {}
    return dict(
        num_moe_experts=model.num_experts,
        moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.expert_ffn_hidden_size,
        moe_router_pre_softmax=model.moe_router_pre_softmax,
        moe_router_score_function="softmax",
        moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=model.moe_shared_expert_gate,
        moe_router_load_balancing_type=model.moe_router_load_balancing_type,
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_token_dispatcher_type="alltoall" if uses_transformer_engine() else "allgather",
        moe_grouped_gemm=uses_transformer_engine(),
        expert_model_parallel_size=parallel.expert_model_parallel_size,
    )


def expert_parallel_problem(
    model: ModelConfig, parallel: ParallelConfig, *, role: str = "model"
) -> str | None:
    """Why EP cannot split ``model``'s experts evenly (None when it can)."""
    ep = parallel.expert_model_parallel_size
    if model.is_moe and model.num_experts % ep:
        return (
            f"--expert-model-parallel-size {ep} does not divide the {role}'s {model.num_experts} experts; "
            "choose an EP size that divides the expert count"
        )
    return None


def check_expert_parallel(model: ModelConfig, parallel: ParallelConfig, *, role: str = "model") -> None:
    """Raised before any weight is allocated."""
    problem = expert_parallel_problem(model, parallel, role=role)
    if problem:
        raise SetupError(problem)


MEGATRON_LLAMA3_ROPE = (1.0, 4.0, 8192)
"""The low/high frequency factors and original context that megatron-core's RoPE scaling fixes."""


def apply_llama3_rope_scaling(gpt, model: ModelConfig) -> None:
    """Llama 3.x frequencies for values megatron-core's ``_apply_scaling`` does not take as arguments.

    GPTModel passes only the factor; Llama 3.1/3.2/3.3 use megatron's fixed values, others (e.g. a
    different original context length) are applied here to the unscaled frequencies, before the
    first forward (RotaryEmbedding caches its output per sequence length).
    """
    rope = getattr(gpt, "rotary_pos_emb", None)
    fixed = (
        model.rope_scaling_low_freq_factor,
        model.rope_scaling_high_freq_factor,
        model.rope_scaling_original_max_position_embeddings,
    )
    if rope is None or not model.use_rope_scaling or fixed == MEGATRON_LLAMA3_ROPE:
        return
    dim = int(model.head_dim * model.rotary_percent)
    unscaled = 1.0 / (
        model.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=rope.inv_freq.device) / dim)
    )
    rope.inv_freq = rope._apply_scaling(
        unscaled,
        factor=model.rope_scaling_factor,
        low_freq_factor=model.rope_scaling_low_freq_factor,
        high_freq_factor=model.rope_scaling_high_freq_factor,
        original_max_position_embeddings=model.rope_scaling_original_max_position_embeddings,
    )


def layer_spec(model: ModelConfig, *, context_parallel: bool = False):
    """Transformer Engine layer spec when TE imports (needed for FP8 and sequence parallel), else local.

    ``context_parallel`` (CP > 1): TE's attention splits the sequence itself; the local spec's
    attention refuses CP, so its core attention becomes ``cp_attention``'s all-gather attention."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if uses_transformer_engine():
        return get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=model.qk_layernorm, num_experts=model.num_experts, moe_grouped_gemm=model.is_moe
        )
    spec = get_gpt_layer_local_spec(
        qk_layernorm=model.qk_layernorm,
        normalization=model.normalization,
        num_experts=model.num_experts,
        moe_grouped_gemm=False,
    )
    if context_parallel:
        from megatron_ddk.models.cp_attention import AllGatherContextParallelAttention

        spec.submodules.self_attention.submodules.core_attention = AllGatherContextParallelAttention
    return spec


def build_gpt_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    *,
    padded_vocab_size: int,
    pg,
    pre_process: bool,
    post_process: bool,
    use_fp8: bool = True,
    initialize_weights: bool = True,
    recompute: RecomputeConfig | None = None,
):
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
    check_expert_parallel(model, parallel)
    check_context_parallel_supported(model, parallel)
    config = build_transformer_config(
        model,
        parallel,
        precision,
        use_fp8=use_fp8,
        initialize_weights=initialize_weights,
        recompute=recompute,
    )
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model, context_parallel=parallel.context_parallel_size > 1),
        vocab_size=padded_vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        rotary_percent=model.rotary_percent,
        rotary_base=model.rotary_base,
        pg_collection=pg,
        rope_scaling=model.use_rope_scaling,
        rope_scaling_factor=model.rope_scaling_factor,
    )
    apply_llama3_rope_scaling(gpt, model)
    if precision.bf16:
        # what megatron's Float16Module does: every parameter in bf16 (the torch norms of the local
        # spec are created in fp32), so the mixed-precision optimizer sees one dtype
        gpt.bfloat16()
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    return gpt
