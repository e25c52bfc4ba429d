"""Typed configuration of a run: one keyword-only dataclass per component, gathered in ``RunConfig``.

The command line (``megatron_ddk.arguments``) fills these objects once; every component receives
the part it needs explicitly. There is no global ``get_args()``. ``ModelConfig`` is also what a
checkpoint records about its model, so a teacher is rebuilt from its checkpoint alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from megatron_ddk.errors import CheckpointError, ConfigError

DDK_MODES = ("cpt", "kd", "ddk")
KD_LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd")
MIXING_MODES = ("ddk", "no-smoothing", "equal", "static", "ddk-smooth0", "ddk-tempered", "ddk-log", "ddk-bounded",
                "ddk-robust")
"""``ddk`` is the paper's exact Eq. 1/2; the ``ddk-*`` modes are this project's variants (docs/DDK.md)."""
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise")


class SetupError(ConfigError, RuntimeError):
    """The run asks for something this machine or installation cannot do (e.g. FP8 without TE)."""


LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of one GPT model (LLaMA / Qwen family); JSON-serialisable, stored in checkpoints."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int
    """True tokenizer vocabulary size; the embedding is padded beyond it (see ``padded_vocab_size``)."""
    max_position_embeddings: int
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; None means multi-head attention."""
    kv_channels: int | None = None
    """Head dimension; None means hidden_size / num_attention_heads."""
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = True
    position_embedding_type: str = "rope"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    untie_embeddings_and_output_weights: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self) -> None:
        problems = []
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.num_attention_heads > 0 and self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            problems.append(f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                            f"{self.num_attention_heads}; set --kv-channels or change one of them")
        groups = self.num_query_groups
        if groups is not None and (groups <= 0 or self.num_attention_heads % groups):
            problems.append(f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                            f"--num-query-groups {groups}")
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            problems.append(f"--normalization must be RMSNorm or LayerNorm, got {self.normalization!r}")
        if self.position_embedding_type not in ("rope", "learned_absolute"):
            problems.append(f"--position-embedding-type must be rope or learned_absolute, got "
                            f"{self.position_embedding_type!r}")
        if problems:
            raise ConfigError("; ".join(problems))

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
            raise CheckpointError(f"unknown model config keys {unknown}: the checkpoint was written by a newer version")
        return cls(**values)

    def layer_matmul_parameters(self) -> int:
        """Weights of one layer's GEMMs (QKV, output projection, MLP): what a token's FLOPs are counted
        from and what tensor parallelism splits."""
        h, f = self.hidden_size, self.ffn_hidden_size
        q, kv = self.num_attention_heads * self.head_dim, 2 * self.query_groups * self.head_dim
        return h * (q + kv) + q * h + h * f * (3 if self.swiglu else 2)

    def layer_parameters(self, tp: int = 1) -> int:
        """Parameters of one transformer layer on one of ``tp`` tensor-parallel ranks: matrices and
        column-parallel biases are split, norms and row-parallel biases are replicated."""
        h, d, f = self.hidden_size, self.head_dim, self.ffn_hidden_size
        q, kv = self.num_attention_heads * d, 2 * self.query_groups * d
        norm = 2 if self.normalization == "LayerNorm" else 1  # weight (+ bias)
        sharded = self.layer_matmul_parameters()
        replicated = 2 * norm * h
        if self.add_qkv_bias or self.add_bias_linear:
            sharded += q + kv
        if self.add_bias_linear:
            sharded += 2 * f if self.swiglu else f  # fc1
            replicated += 2 * h  # linear_proj, linear_fc2
        if self.qk_layernorm:
            replicated += 2 * norm * d
        return sharded // tp + replicated

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
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    """Needs Transformer Engine's norm (megatron-core's torch norm refuses it)."""
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False


@dataclass(frozen=True, kw_only=True)
class PrecisionConfig:
    bf16: bool = False
    fp8_format: str | None = None
    """e4m3 or hybrid; needs Transformer Engine and an FP8-capable GPU (Hopper or newer)."""
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    micro_batch_size: int
    global_batch_size: int
    train_iters: int
    lr: float = 3e-5
    min_lr: float = 3e-6
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"
    lr_decay_iters: int | None = None
    """None means --train-iters."""
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    exit_interval: int | None = None
    """Stop (after saving) once the iteration count is a multiple of this; for job-time limits."""
    exit_signal_handler: bool = False
    """Save and stop at the end of the iteration in which SIGTERM arrived."""


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False
    """Load only the weights: iteration, optimizer, scheduler and data state start fresh."""


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    log_interval: int = 10
    eval_interval: int | None = None
    eval_iters: int = 10
    """Validation micro-batches per domain for the periodic (non-DDK) validation."""
    tensorboard_dir: str | None = None


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    tokenizer_type: str
    tokenizer_model: str
    domains: str | None = None
    """Domain registry file (YAML/JSON)."""
    data_path: tuple[str, ...] = ()
    """Megatron's static form: ``W1 PREFIX1 W2 PREFIX2 ...`` (or prefixes alone)."""
    data_cache_path: str | None = None
    seq_length: int = 2048


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    mode: str = "ddk"
    teacher_load: str | None = None
    kd_loss_type: str = "forward_kl"
    kd_temperature: float = 1.0
    kd_weight: float = 0.2
    """gamma in Eq. 3: loss = CE + gamma * KD."""
    kd_jsd_beta: float = 0.5
    kd_chunk_size: int | None = None
    """Tokens per KD-loss chunk; None sizes chunks to ~16M logits of the local vocabulary shard."""
    teacher_bf16: bool | None = None
    """None follows the student's --bf16."""
    teacher_fp8: bool = True
    """With --fp8-format, run the teacher's forward in FP8 as well."""

    @property
    def uses_teacher(self) -> bool:
        return self.mode in ("kd", "ddk")


@dataclass(frozen=True, kw_only=True)
class DDKConfig:
    interval: int = 1000
    """K: iterations between domain-weight updates."""
    alpha: float = 0.5
    val_samples: int = 500
    mixing: str = "ddk"
    temperature: float = 1.0
    """tau of ``ddk-tempered`` / ``ddk-log`` / ``ddk-robust``: the exponent of Eq. 1/2 is divided by it."""
    max_step: float = 0.25
    """``ddk-bounded`` / ``ddk-robust``: the most one update may move the mixture (total variation distance)."""
    log_file: str | None = None
    """JSONL of every update; defaults to <save>/ddk_log.jsonl."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    training: TrainingConfig
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig
    distill: DistillConfig = field(default_factory=DistillConfig)
    ddk: DDKConfig = field(default_factory=DDKConfig)

    @property
    def teacher_precision(self) -> PrecisionConfig:
        """The student's precision with ``--teacher-bf16`` applied (None follows ``--bf16``)."""
        if self.distill.teacher_bf16 is None:
            return self.precision
        return dataclasses.replace(self.precision, bf16=self.distill.teacher_bf16)
