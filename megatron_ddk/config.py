"""Typed configuration of a run: one keyword-only dataclass per component, gathered in ``RunConfig``.

The dataclasses are the single source of the command line: each field carries its default, its
help text and (through ``option``) its flag; ``megatron_ddk.arguments`` generates the parser from
them, and each class checks its own values in ``__post_init__`` (``ConfigError``, every problem at
once). Checks that need the world size or relate flags of several classes live in
``arguments``. Every component receives the part it needs explicitly; there is no global
``get_args()``. ``ModelConfig`` is also what a checkpoint records about its model, so a teacher is
rebuilt from its checkpoint alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from megatron_ddk.errors import CheckpointError, ConfigError

TEACHER_CACHE_VERIFY = ("before-training", "sizes-only")
DDK_MODES = ("cpt", "kd", "ddk")
KD_LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd")
MIXING_MODES = (
    "ddk",
    "no-smoothing",
    "equal",
    "static",
    "ddk-smooth0",
    "ddk-tempered",
    "ddk-log",
    "ddk-bounded",
    "ddk-robust",
)
"""``ddk`` is the paper's exact Eq. 1/2; the ``ddk-*`` modes are this project's variants (docs/DDK.md)."""
DYNAMIC_MIXING_MODES = tuple(m for m in MIXING_MODES if m not in ("equal", "static"))
DDK_SIGNALS = ("ppl-ratio", "kd-gap")
"""What DDK's factor is computed from: the paper's perplexity ratio, or this project's KD gap (docs/DDK.md)."""
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
MOE_LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "none")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


class SetupError(ConfigError, RuntimeError):
    """The run asks for something this machine or installation cannot do (e.g. FP8 without TE)."""


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = "",
    flag_default: Any = dataclasses.MISSING,
    **parser: Any,
) -> Any:
    """A config field with its command-line interface.

    ``help``: the flag's help text (and the field's documentation); ``flag``: its spelling ("" = the
    field name with the class's flag prefix, None = no flag: the value is derived from others);
    ``flag_default``: the flag's default when it differs from the field's (None = "derived", e.g.
    ``--ffn-hidden-size`` defaults to 4 x hidden); ``parser``: extra ``add_argument`` keywords
    (``choices``, ``nargs``). A field without a default and without ``flag_default`` is a required flag.
    """
    metadata = {"help": help, "flag": flag, "flag_default": flag_default, "parser": parser}
    return field(default=default, metadata=metadata)


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ConfigError("\n".join(problems))


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of one GPT model (LLaMA / Qwen family); JSON-serialisable, stored in checkpoints."""

    num_layers: int = option(help="transformer layers")
    hidden_size: int = option(help="hidden (model) dimension h")
    num_attention_heads: int = option(help="query heads")
    ffn_hidden_size: int = option(help="MLP inner dimension (default: 4 x --hidden-size)", flag_default=None)
    vocab_size: int = option(
        flag=None,
        help="the tokenizer's true vocabulary; the embedding is padded beyond it "
        "(data.tokenizer.padded_vocab_size)",
    )
    max_position_embeddings: int = option(
        help="longest sequence the position embedding covers (default: --seq-length)", flag_default=None
    )
    num_query_groups: int | None = option(
        None,
        help="key/value heads (grouped-query attention); implies "
        "--group-query-attention; default: multi-head attention",
    )
    kv_channels: int | None = option(None, help="head dimension (default: hidden size / attention heads)")
    normalization: str = option("RMSNorm", help="normalization layer", choices=("RMSNorm", "LayerNorm"))
    norm_epsilon: float = option(1e-5, help="epsilon of the normalization layers")
    swiglu: bool = option(
        True, help="SwiGLU MLP (LLaMA/Qwen); without the flag: GELU (Megatron's default)", flag_default=False
    )
    position_embedding_type: str = option(
        "rope", help="position embedding", choices=("rope", "learned_absolute")
    )
    rotary_base: float = option(10000.0, help="RoPE base period")
    rotary_percent: float = option(1.0, help="fraction of each head's dimensions that RoPE rotates")
    untie_embeddings_and_output_weights: bool = option(
        True,
        help="separate input embedding and output layer; without the flag: tied (Megatron's default)",
        flag_default=False,
    )
    add_bias_linear: bool = option(
        False,
        flag="--disable-bias-linear",
        help="no biases in the linear layers (LLaMA/Qwen); without the flag: biases (Megatron's default)",
    )
    add_qkv_bias: bool = option(False, help="biases on the query/key/value projection only (Qwen2)")
    qk_layernorm: bool = option(False, help="normalize queries and keys per head (Qwen3)")
    init_method_std: float = option(0.02, help="standard deviation of the random initialization")
    attention_dropout: float = option(0.0, help="dropout on the attention probabilities")
    hidden_dropout: float = option(0.0, help="dropout on the hidden states")
    make_vocab_size_divisible_by: int = option(128, help="pad the vocabulary to a multiple of this x TP size")
    use_rope_scaling: bool = option(
        False, help="Llama 3.x RoPE frequency scaling (HF rope_scaling type llama3)"
    )
    rope_scaling_factor: float = option(8.0, help="Llama 3.x RoPE scaling factor: 8 (3.1), 32 (3.2)")
    rope_scaling_low_freq_factor: float = option(1.0, help="Llama 3.x RoPE scaling: low-frequency factor")
    rope_scaling_high_freq_factor: float = option(4.0, help="Llama 3.x RoPE scaling: high-frequency factor")
    rope_scaling_original_max_position_embeddings: int = option(
        8192, help="Llama 3.x RoPE scaling: the context length of pre-training"
    )
    num_experts: int | None = option(
        None, help="routed experts per layer (every layer MoE); default: dense MLP"
    )
    moe_router_topk: int = option(2, help="experts each token is routed to")
    moe_ffn_hidden_size: int | None = option(
        None, help="each routed expert's hidden size (default: --ffn-hidden-size)"
    )
    moe_router_pre_softmax: bool = option(
        False,
        help="softmax over all experts, then top-k, without renormalising (HF norm_topk_prob=False); "
        "without the flag: top-k, then softmax over the k chosen (Mixtral)",
    )
    moe_shared_expert_intermediate_size: int | None = option(
        None, help="hidden size of an always-on shared expert (Qwen2-MoE); default: none"
    )
    moe_shared_expert_gate: bool = option(
        False, help="sigmoid gate on the shared expert's output (Qwen2-MoE)"
    )
    moe_router_load_balancing_type: str = option(
        "aux_loss", help="load-balancing loss of an MoE student", choices=MOE_LOAD_BALANCING_TYPES
    )
    moe_aux_loss_coeff: float = option(
        0.0,
        help="load-balancing loss weight; applies only when this model is "
        "trained (an MoE student, never a teacher)",
    )

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "ffn_hidden_size",
            "vocab_size",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if (
            self.num_attention_heads > 0
            and self.kv_channels is None
            and self.hidden_size % self.num_attention_heads
        ):
            problems.append(
                f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                f"{self.num_attention_heads}; set --kv-channels or change one of them"
            )
        groups = self.num_query_groups
        if groups is not None and (groups <= 0 or self.num_attention_heads % groups):
            problems.append(
                f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                f"--num-query-groups {groups}"
            )
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            problems.append(f"--normalization must be RMSNorm or LayerNorm, got {self.normalization!r}")
        if self.position_embedding_type not in ("rope", "learned_absolute"):
            problems.append(
                f"--position-embedding-type must be rope or learned_absolute, got "
                f"{self.position_embedding_type!r}"
            )
        problems += self._moe_problems()
        if self.use_rope_scaling and not (
            self.rope_scaling_factor >= 1.0
            and 0 < self.rope_scaling_low_freq_factor < self.rope_scaling_high_freq_factor
        ):
            problems.append(
                f"--rope-scaling-factor {self.rope_scaling_factor} must be >= 1 and the low/high frequency "
                f"factors ({self.rope_scaling_low_freq_factor}, {self.rope_scaling_high_freq_factor}) "
                "positive and increasing"
            )
        _raise_if(problems)

    def _moe_problems(self) -> list[str]:
        if self.num_experts is None:
            return (
                ["--moe-shared-expert-intermediate-size needs --num-experts"]
                if self.moe_shared_expert_intermediate_size
                else []
            )
        problems = []
        if self.num_experts < 1 or not 1 <= self.moe_router_topk <= self.num_experts:
            problems.append(
                f"--moe-router-topk {self.moe_router_topk} must be between 1 and --num-experts "
                f"{self.num_experts}"
            )
        if self.moe_router_topk == 1 and not self.moe_router_pre_softmax:
            problems.append(
                "--moe-router-topk 1 needs --moe-router-pre-softmax (megatron-core's router: a softmax "
                "over one chosen expert has no gradient)"
            )
        if self.moe_shared_expert_gate and not self.moe_shared_expert_intermediate_size:
            problems.append("--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size")
        if self.moe_router_load_balancing_type not in MOE_LOAD_BALANCING_TYPES:
            problems.append(
                f"--moe-router-load-balancing-type must be one of {', '.join(MOE_LOAD_BALANCING_TYPES)}, "
                f"got {self.moe_router_load_balancing_type!r}"
            )
        if self.add_bias_linear:
            problems.append(
                "--num-experts needs --disable-bias-linear (megatron-core's experts have no biases)"
            )
        return problems

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CheckpointError(
                f"unknown model config keys {unknown}: the checkpoint was written by a newer version"
            )
        return cls(**values)

    def _attention_matmul_parameters(self) -> int:
        h, q, kv = (
            self.hidden_size,
            self.num_attention_heads * self.head_dim,
            2 * self.query_groups * self.head_dim,
        )
        return h * (q + kv) + q * h

    def _mlp_matmul_parameters(self, ffn: int) -> int:
        return self.hidden_size * ffn * (3 if self.swiglu else 2)

    def _shared_expert_parameters(self) -> int:
        return self._mlp_matmul_parameters(self.moe_shared_expert_intermediate_size or 0)

    def layer_matmul_parameters(self) -> int:
        """Weights of one layer's GEMMs that one token goes through (QKV, output projection, MLP; for
        MoE the router, its top-k experts and the shared expert): what a token's FLOPs are counted from."""
        if not self.is_moe:
            return self._attention_matmul_parameters() + self._mlp_matmul_parameters(self.ffn_hidden_size)
        return (
            self._attention_matmul_parameters()
            + self.num_experts * self.hidden_size
            + self.moe_router_topk * self._mlp_matmul_parameters(self.expert_ffn_hidden_size)
            + self._shared_expert_parameters()
        )

    def layer_parameters(self, tp: int = 1, ep: int = 1) -> int:
        """Parameters of one transformer layer on one of ``tp`` tensor-parallel ranks: matrices and
        column-parallel biases are split, norms and row-parallel biases are replicated; routed experts
        are split over ``ep`` x ``tp`` (megatron-core's expert TP is TP), the router is replicated."""
        h, d, f = self.hidden_size, self.head_dim, self.ffn_hidden_size
        q, kv = self.num_attention_heads * d, 2 * self.query_groups * d
        norm = 2 if self.normalization == "LayerNorm" else 1  # weight (+ bias)
        replicated, experts = 2 * norm * h, 0
        if self.is_moe:
            sharded = self._attention_matmul_parameters() + self._shared_expert_parameters()
            experts = self.num_experts * self._mlp_matmul_parameters(self.expert_ffn_hidden_size)
            replicated += self.num_experts * h + (h if self.moe_shared_expert_gate else 0)  # router, gate
        else:
            sharded = self.layer_matmul_parameters()
        if self.add_qkv_bias or self.add_bias_linear:
            sharded += q + kv
        if self.add_bias_linear:
            sharded += 2 * f if self.swiglu else f  # fc1
            replicated += 2 * h  # linear_proj, linear_fc2
        if self.qk_layernorm:
            replicated += 2 * norm * d
        return sharded // tp + experts // (tp * ep) + replicated

    def num_parameters(self) -> int:
        """Parameter count (unpadded vocabulary), the way model cards count it."""
        h = self.hidden_size
        embeddings = self.vocab_size * h * (2 if self.untie_embeddings_and_output_weights else 1)
        if self.position_embedding_type == "learned_absolute":
            embeddings += self.max_position_embeddings * h
        final_norm = (2 if self.normalization == "LayerNorm" else 1) * h
        return self.num_layers * self.layer_parameters() + embeddings + final_norm


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How the model is split: tensor x pipeline parallel (the rest of the world is data parallel)."""

    tensor_model_parallel_size: int = option(1, help="tensor-parallel ranks (split each layer's matrices)")
    pipeline_model_parallel_size: int = option(1, help="pipeline stages (split the layers)")
    expert_model_parallel_size: int = option(
        1,
        help="EP for MoE models (student and teacher): each model's experts "
        "split over this many data-parallel ranks",
    )
    sequence_parallel: bool = option(
        False,
        help="shard activations along the sequence between TP ranks; needs "
        "Transformer Engine's norm (megatron-core's torch norm refuses it)",
    )
    use_distributed_optimizer: bool = option(False, help="shard the optimizer state over data-parallel ranks")
    overlap_grad_reduce: bool = option(False, help="overlap the gradient all-reduce with the backward pass")
    overlap_param_gather: bool = option(False, help="overlap the parameter all-gather with the forward pass")
    context_parallel_size: int = option(
        1,
        help="split each sequence over this many ranks (teacher and student): Transformer Engine's "
        "attention on GPU, all-gather attention otherwise",
    )

    def __post_init__(self) -> None:
        problems = []
        if self.tensor_model_parallel_size < 1 or self.pipeline_model_parallel_size < 1:
            problems.append("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            problems.append("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            problems.append("--overlap-param-gather needs --use-distributed-optimizer")
        _raise_if(problems)


@dataclass(frozen=True, kw_only=True)
class RecomputeConfig:
    """Activation recomputation of the student, with Megatron-LM's flag meanings (``--recompute-*``).

    The teacher never recomputes: it runs forward-only under ``no_grad`` and keeps no activations.
    The flags' consistency with each other and with the layers per stage is checked in
    ``scaling_checks.recompute_problems`` (it needs the model and pipeline flags too).
    """

    granularity: str | None = option(
        None,
        help="full: recompute whole layers; selective: the core attention only",
        choices=RECOMPUTE_GRANULARITIES,
    )
    method: str | None = option(
        None,
        help="with full: uniform (groups of --recompute-num-layers layers, each group's "
        "input kept) or block (the first --recompute-num-layers layers of each "
        "pipeline stage)",
        choices=RECOMPUTE_METHODS,
    )
    num_layers: int | None = option(None, help="layers per recomputed group (uniform) or per stage (block)")


@dataclass(frozen=True, kw_only=True)
class PrecisionConfig:
    """Number formats of the student (the teacher's: ``RunConfig.teacher_precision``)."""

    bf16: bool = option(False, help="bf16 parameters and activations (fp32 main weights in the optimizer)")
    fp8_format: str | None = option(
        None,
        help="FP8 GEMMs: e4m3 or hybrid; needs Transformer Engine and an FP8-capable GPU (Hopper or newer)",
        choices=FP8_FORMATS,
    )
    fp8_recipe: str = option("delayed", help="FP8 scaling recipe", choices=FP8_RECIPES)
    fp8_amax_history_len: int = option(1024, help="amax history length of the delayed recipe")
    fp8_amax_compute_algo: str = option(
        "max", help="how the delayed recipe reduces the amax history", choices=("max", "most_recent")
    )

    def __post_init__(self) -> None:
        if self.fp8_format is not None and not self.bf16:
            raise ConfigError("--fp8-format needs --bf16 (FP8 GEMMs with bf16 everywhere else)")


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """Batch sizes, length, optimizer (Adam) and learning-rate schedule, seed and exit conditions."""

    micro_batch_size: int = option(help="samples per micro-batch on one data-parallel rank")
    global_batch_size: int = option(
        help="samples per optimizer step (default: micro batch x data parallel)", flag_default=None
    )
    train_iters: int = option(help="optimizer steps to train for")
    lr: float = option(3e-5, help="peak learning rate (the paper's 3e-5)")
    min_lr: float = option(3e-6, help="learning rate at the end of the decay")
    lr_warmup_iters: int = option(0, help="linear warm-up steps from 0 to --lr")
    lr_decay_style: str = option("cosine", help="decay from --lr to --min-lr", choices=LR_DECAY_STYLES)
    lr_decay_iters: int | None = option(None, help="decay length (default: --train-iters)")
    weight_decay: float = option(0.01, help="AdamW weight decay")
    adam_beta1: float = option(0.9, help="Adam beta1")
    adam_beta2: float = option(0.95, help="Adam beta2")
    adam_eps: float = option(1e-8, help="Adam epsilon")
    clip_grad: float = option(1.0, help="clip the global gradient norm to this (0: no clipping)")
    seed: int = option(1234, help="seed of the model init, dropout and the data order")
    exit_interval: int | None = option(
        None, help="save and exit when the iteration is a multiple of this (for job-time limits)"
    )
    exit_signal_handler: bool = option(
        False,
        help="on SIGTERM (e.g. SLURM's pre-emption notice), save a checkpoint "
        "at the end of the iteration and exit cleanly",
    )
    check_for_nan_in_loss_and_grad: bool = option(
        True,
        help="stop, without saving, on a non-finite lm/kd loss, grad norm or teacher output (default: on; "
        "--no-check-for-nan-in-loss-and-grad turns it off)",
        action="store_true",
    )

    def __post_init__(self) -> None:
        problems = []
        if self.micro_batch_size < 1:
            problems.append(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        if self.train_iters < 1:
            problems.append(f"--train-iters must be >= 1, got {self.train_iters}")
        decay = self.lr_decay_iters or self.train_iters
        if self.lr_warmup_iters >= decay:
            problems.append(
                f"--lr-warmup-iters {self.lr_warmup_iters} must be smaller than the decay length {decay} "
                "(--lr-decay-iters, default --train-iters)"
            )
        _raise_if(problems)


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Where checkpoints go and what a resume restores."""

    save: str | None = option(
        None, help="directory for checkpoints (Megatron layout: iter_NNNNNNN/ + tracker)"
    )
    load: str | None = option(
        None, help="resume from this checkpoint directory (an empty --save dir starts fresh)"
    )
    ckpt_step: int | None = option(
        None, help="load iteration N under --load instead of the latest (e.g. the newest intact one)"
    )
    save_interval: int | None = option(None, help="save every this many iterations (and always at the end)")
    no_load_optim: bool = option(False, help="resume without the optimizer state")
    no_load_rng: bool = option(False, help="resume without the random-generator states")
    finetune: bool = option(
        False, help="load only the weights of --load; iteration, optimizer and data start fresh"
    )
    async_save: bool = option(
        False,
        help="write checkpoints in a background process while training goes on; each is published "
        "(renamed, tracker updated) once written and checksummed",
    )

    def __post_init__(self) -> None:
        problems = []
        if self.save_interval is not None and not self.save:
            problems.append("--save-interval needs --save DIR")
        if self.async_save and not self.save:
            problems.append("--async-save needs --save DIR")
        if self.ckpt_step is not None and not self.load:
            problems.append("--ckpt-step needs --load DIR")
        _raise_if(problems)


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """Log lines, TensorBoard and the periodic (non-DDK) validation."""

    log_interval: int = option(10, help="print a training log line every this many iterations")
    eval_interval: int | None = option(None, help="validate every this many iterations (default: never)")
    eval_iters: int = option(10, help="validation micro-batches per domain for the periodic validation")
    tensorboard_dir: str | None = option(None, help="write TensorBoard scalars here")

    def __post_init__(self) -> None:
        if self.log_interval < 1:
            raise ConfigError(f"--log-interval must be >= 1, got {self.log_interval}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The tokenizer and the domain datasets."""

    tokenizer_type: str = option(
        help="tokenizer implementation", choices=("SentencePieceTokenizer", "HuggingFaceTokenizer")
    )
    tokenizer_model: str = option(
        help="SentencePiece .model file, or a Hugging Face tokenizer.json (or its dir)"
    )
    domains: str | None = option(None, help="domain registry (YAML/JSON), see docs/DATA.md")
    data_path: tuple[str, ...] = option(
        (),
        help="Megatron's static form: W1 PREFIX1 W2 PREFIX2 ... (or prefixes alone)",
        flag_default=None,
        nargs="+",
    )
    data_cache_path: str | None = option(
        None, help="where GPTDataset index caches go (default: <save>/data_cache)"
    )
    seq_length: int = option(2048, help="tokens per sample", required=True)

    def __post_init__(self) -> None:
        problems = []
        if self.domains is None and not self.data_path:
            problems.append(
                "no data: give --domains REGISTRY.yaml or --data-path [W1] PREFIX1 [W2 PREFIX2 ...]"
            )
        if self.domains is not None and self.data_path:
            problems.append("give either --domains or --data-path, not both")
        if self.seq_length < 1:
            problems.append(f"--seq-length must be >= 1, got {self.seq_length}")
        _raise_if(problems)


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """The teacher and the distillation loss (the paper's Eq. 3)."""

    mode: str = option(
        "ddk",
        flag="--ddk-mode",
        choices=DDK_MODES,
        help="cpt: student alone; kd: teacher, static mixture; ddk: teacher, dynamic mixture",
    )
    teacher_load: str | None = option(
        None, help="the teacher's checkpoint (tools/convert_hf_to_megatron.py writes one)"
    )
    teacher_cache: str | None = option(
        None,
        help="teacher top-k cache (tools/cache_teacher_logits.py): no teacher model "
        "is built unless --teacher-load is also given, which then only "
        "serves samples the cache lacks",
    )
    teacher_cache_verify: str = option(
        "before-training",
        choices=TEACHER_CACHE_VERIFY,
        help="before-training: sha256 of every cache shard the run can read, split over the ranks, "
        "before the first iteration; sizes-only: skip it (shard sizes, sample ids and token "
        "fingerprints are still checked), e.g. on restarts of a run over a cache verified once",
    )
    kd_loss_type: str = option(
        "forward_kl", help="divergence between teacher and student", choices=KD_LOSS_TYPES
    )
    kd_temperature: float = option(1.0, help="softmax temperature T of both models in the KD term")
    kd_weight: float = option(0.2, help="gamma: loss = CE + gamma * KD")
    kd_jsd_beta: float = option(0.5, help="beta of --kd-loss-type jsd")
    kd_chunk_size: int | None = option(
        None,
        help="tokens per chunk of the KD loss (default: 16M / vocabulary shard, e.g. 110 for Qwen at TP=1)",
    )
    teacher_bf16: bool | None = option(None, help="run the teacher in bf16 (default: follow --bf16)")
    teacher_fp8: bool = option(True, help="with --fp8-format, run the teacher's forward in FP8 as well")

    def __post_init__(self) -> None:
        problems = []
        if self.kd_temperature <= 0:
            problems.append(f"--kd-temperature must be > 0, got {self.kd_temperature}")
        if self.kd_weight < 0:
            problems.append(f"--kd-weight must be >= 0, got {self.kd_weight}")
        if not 0.0 <= self.kd_jsd_beta <= 1.0:
            problems.append(f"--kd-jsd-beta must be in [0, 1], got {self.kd_jsd_beta}")
        if self.mode == "cpt" and self.teacher_load:
            problems.append(
                "--teacher-load is given but --ddk-mode cpt trains without a teacher; use --ddk-mode kd "
                "or ddk"
            )
        if self.mode in ("kd", "ddk") and not (self.teacher_load or self.teacher_cache):
            problems.append(
                f"--ddk-mode {self.mode} needs a teacher: add --teacher-load DIR or --teacher-cache DIR "
                "(or use --ddk-mode cpt)"
            )
        if self.mode == "cpt" and self.teacher_cache:
            problems.append(
                "--teacher-cache is given but --ddk-mode cpt trains without a teacher; use --ddk-mode kd "
                "or ddk"
            )
        if self.teacher_cache_verify != "before-training" and not self.teacher_cache:
            problems.append(
                f"--teacher-cache-verify {self.teacher_cache_verify} needs --teacher-cache DIR (there is "
                "no cache to verify)"
            )
        _raise_if(problems)

    @property
    def uses_teacher(self) -> bool:
        return self.mode in ("kd", "ddk")


@dataclass(frozen=True, kw_only=True)
class DDKConfig:
    """Domain mixing: DDK's every-K update (Eq. 1-2) or an ablation. Flags are ``--ddk-<field>``."""

    interval: int = option(1000, help="K: iterations between domain-weight updates")
    alpha: float = option(
        0.5, help="smoothing of Eq. 2: weight of the new factor against the uniform mixture"
    )
    val_samples: int = option(500, help="validation samples per domain for each DDK evaluation")
    mixing: str = option(
        "ddk",
        help="ddk (the paper's Eq. 1-2), no-smoothing (Eq. 1 every K), equal, static "
        "(registry weights), or a variant beyond the paper: ddk-log (ratios in log "
        "space; recommended when the ratios differ by more than ~1, docs/DDK.md), "
        "ddk-smooth0, ddk-tempered, ddk-bounded, ddk-robust",
        choices=MIXING_MODES,
    )
    temperature: float = option(
        1.0, help="tau of ddk-tempered, ddk-log and ddk-robust: Eq. 1/2's exponent is divided by it"
    )
    max_step: float = option(
        0.25,
        help="ddk-bounded / ddk-robust: the most one update may move the mixture (total variation distance)",
    )
    signal: str = option(
        "ppl-ratio",
        help="what the factor is computed from: ppl-ratio (the paper: ppl_S / ppl_T on each domain's "
        "validation set) or kd-gap (exp of the mean per-token KD divergence, teacher || student, on "
        "the same samples; the teacher runs at every update)",
        choices=DDK_SIGNALS,
    )
    log_file: str | None = option(None, help="JSONL of every update (default <save>/ddk_log.jsonl)")

    def __post_init__(self) -> None:
        problems = []
        if self.interval < 1:
            problems.append(f"--ddk-interval must be >= 1, got {self.interval}")
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"--ddk-alpha must be in [0, 1], got {self.alpha}")
        if self.val_samples < 1:
            problems.append(f"--ddk-val-samples must be >= 1, got {self.val_samples}")
        if not self.temperature > 0:
            problems.append(f"--ddk-temperature must be > 0, got {self.temperature}")
        if not 0 < self.max_step <= 1:
            problems.append(f"--ddk-max-step must be in (0, 1], got {self.max_step}")
        _raise_if(problems)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one run needs, one part per component; ``arguments.parse_run`` builds it from the flags."""

    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    training: TrainingConfig
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(mode="cpt"))
    ddk: DDKConfig = field(default_factory=DDKConfig)

    @property
    def teacher_precision(self) -> PrecisionConfig:
        """The student's precision with ``--teacher-bf16`` applied (None follows ``--bf16``)."""
        if self.distill.teacher_bf16 is None:
            return self.precision
        return dataclasses.replace(self.precision, bf16=self.distill.teacher_bf16)
