"""Per-GPU memory of a DDK run: a frozen teacher and a trained student under one TP x PP x DP layout.

Why: the teacher (13-14B parameters) and the student's training state share every GPU, so the
layout choice (TP, PP, distributed optimizer, micro-batch size) is a memory question first. This
tool answers it before a job is queued; ``--sweep`` lists every valid (TP, PP) on N GPUs and marks
what fits. Estimates, not measurements: the model of each component is stated below and in
docs/CLUSTER.md, and the allowance for the CUDA context, NCCL and fragmentation is a flag.

    python tools/estimate_memory.py --teacher qwen1.5-14b --student qwen1.5-1.8b --tp 1 --pp 1 --dp 16 \
        --micro-batch-size 2 --seq-length 2048 --use-distributed-optimizer
    python tools/estimate_memory.py --teacher llama2-13b --student tinyllama-1.1b --sweep --num-gpus 16

Components, per GPU, for the pipeline stage that needs the most (bytes; P = parameters on this GPU):
  teacher weights       bf16 (2 P_T); frozen: no gradients, no optimizer state
  student weights       2 P_S (bf16) or 4 P_S (fp32)
  student grads         4 P_S: fp32 main grads in the DDP buffers (grad_reduce_in_fp32)
  optimizer state       Adam: fp32 master params + 2 moments = 12 P_S with bf16 (8 P_S with fp32
                        params, no master copy); divided by DP with --use-distributed-optimizer
  activations           student layers x in-flight micro-batches (1F1B keeps PP - stage of them on
                        a stage) x per-layer bytes (``layer_activation_bytes``); no recomputation
  pipeline buffers      PP > 1: each in-flight micro-batch holds [student | teacher] hidden states
  teacher working set   one teacher layer's forward intermediates (no_grad: freed layer by layer)
  logits and KD loss    last stage, one micro-batch: student + teacher logits, the fp32 softmax
                        that vocab-parallel CE saves, the KD gradient stored by the chunked loss,
                        the fp32 logits gradient, and the fp32 per-chunk workspace of the KD loss
  allowance             CUDA context, NCCL buffers, allocator fragmentation (--overhead-gib)

Shapes: s = sequence length, b = micro-batch size, h = hidden size, f = FFN size, V = padded vocab.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import _bootstrap  # noqa: F401  (megatron_ddk importable from a source checkout)

from megatron_ddk.config import ModelConfig
from megatron_ddk.data.tokenizer import padded_vocab_size
from megatron_ddk.distill.kd_loss import default_chunk_size
from megatron_ddk.errors import ConfigError, UserError

GIB = 1024**3

# Public Hugging Face config.json values; vocab_size is the HF embedding row count.
PRESETS: dict[str, ModelConfig] = {
    "qwen1.5-14b": ModelConfig(
        num_layers=40,
        hidden_size=5120,
        num_attention_heads=40,
        ffn_hidden_size=13696,
        vocab_size=152064,
        max_position_embeddings=32768,
        norm_epsilon=1e-6,
        rotary_base=1e6,
        add_qkv_bias=True,
    ),
    "qwen1.5-7b": ModelConfig(
        num_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        ffn_hidden_size=11008,
        vocab_size=151936,
        max_position_embeddings=32768,
        norm_epsilon=1e-6,
        rotary_base=1e6,
        add_qkv_bias=True,
    ),
    "qwen1.5-4b": ModelConfig(
        num_layers=40,
        hidden_size=2560,
        num_attention_heads=20,
        ffn_hidden_size=6912,
        vocab_size=151936,
        max_position_embeddings=32768,
        norm_epsilon=1e-6,
        rotary_base=5e6,
        add_qkv_bias=True,
    ),
    "qwen1.5-1.8b": ModelConfig(
        num_layers=24,
        hidden_size=2048,
        num_attention_heads=16,
        ffn_hidden_size=5504,
        vocab_size=151936,
        max_position_embeddings=32768,
        norm_epsilon=1e-6,
        rotary_base=1e6,
        add_qkv_bias=True,
    ),
    "llama2-13b": ModelConfig(
        num_layers=40,
        hidden_size=5120,
        num_attention_heads=40,
        ffn_hidden_size=13824,
        vocab_size=32000,
        max_position_embeddings=4096,
        norm_epsilon=1e-5,
        rotary_base=1e4,
    ),
    "tinyllama-1.1b": ModelConfig(
        num_layers=22,
        hidden_size=2048,
        num_attention_heads=32,
        num_query_groups=4,
        ffn_hidden_size=5632,
        vocab_size=32000,
        max_position_embeddings=2048,
        norm_epsilon=1e-5,
        rotary_base=1e4,
    ),
    "llama3.1-8b": ModelConfig(
        num_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_query_groups=8,
        ffn_hidden_size=14336,
        vocab_size=128256,
        max_position_embeddings=131072,
        norm_epsilon=1e-5,
        rotary_base=5e5,
        add_bias_linear=False,
        use_rope_scaling=True,
        rope_scaling_factor=8.0,
    ),
    "llama3.1-70b": ModelConfig(
        num_layers=80,
        hidden_size=8192,
        num_attention_heads=64,
        num_query_groups=8,
        ffn_hidden_size=28672,
        vocab_size=128256,
        max_position_embeddings=131072,
        norm_epsilon=1e-5,
        rotary_base=5e5,
        add_bias_linear=False,
        use_rope_scaling=True,
        rope_scaling_factor=8.0,
    ),
    "llama3.2-1b": ModelConfig(
        num_layers=16,
        hidden_size=2048,
        num_attention_heads=32,
        num_query_groups=8,
        ffn_hidden_size=8192,
        vocab_size=128256,
        max_position_embeddings=131072,
        norm_epsilon=1e-5,
        rotary_base=5e5,
        add_bias_linear=False,
        untie_embeddings_and_output_weights=False,
        use_rope_scaling=True,
        rope_scaling_factor=32.0,
    ),
    "mixtral-8x7b": ModelConfig(
        num_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_query_groups=8,
        ffn_hidden_size=14336,
        vocab_size=32000,
        max_position_embeddings=32768,
        norm_epsilon=1e-5,
        rotary_base=1e6,
        add_bias_linear=False,
        num_experts=8,
        moe_router_topk=2,
        moe_aux_loss_coeff=0.02,
    ),
    "qwen3-30b-a3b": ModelConfig(
        num_layers=48,
        hidden_size=2048,
        num_attention_heads=32,
        num_query_groups=4,
        kv_channels=128,
        ffn_hidden_size=6144,
        vocab_size=151936,
        max_position_embeddings=40960,
        norm_epsilon=1e-6,
        rotary_base=1e6,
        add_bias_linear=False,
        qk_layernorm=True,
        num_experts=128,
        moe_router_topk=8,
        moe_ffn_hidden_size=768,
        moe_aux_loss_coeff=0.001,
    ),
    "qwen3-1.7b": ModelConfig(
        num_layers=28,
        hidden_size=2048,
        num_attention_heads=16,
        num_query_groups=8,
        ffn_hidden_size=6144,
        vocab_size=151936,
        max_position_embeddings=40960,
        norm_epsilon=1e-6,
        rotary_base=1e6,
        add_bias_linear=False,
        qk_layernorm=True,
        untie_embeddings_and_output_weights=False,
    ),
}
PUBLISHED_PARAMETERS = {
    "llama3.1-8b": 8.03e9,
    "llama3.1-70b": 70.6e9,
    "llama3.2-1b": 1.24e9,
    "mixtral-8x7b": 46.7e9,
    "qwen3-30b-a3b": 30.5e9,
}
"""Model-card parameter counts (Meta, Mistral AI, Qwen); the presets' num_parameters() is tested against them."""


class EstimateError(ConfigError):
    """The layout or the model shapes do not make a valid run; the message names the flag."""


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Parallel layout and batch shape of one run (the flags pretrain_ddk.py takes)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    """Expert parallelism for MoE models, carved out of DP: experts split over EP x TP ranks."""
    micro_batch_size: int = 1
    seq_length: int = 2048
    global_batch_size: int | None = None
    """None: assume enough micro-batches to fill the pipeline (at least PP)."""
    use_distributed_optimizer: bool = False
    sequence_parallel: bool = False
    bf16: bool = True
    flash_attention: bool = True
    """TE fused / flash attention keeps no [s, s] score matrix; False models the unfused local path."""
    kd_chunk_size: int | None = None
    """Tokens per KD-loss chunk; None: pretrain_ddk.py's default (``kd_loss.default_chunk_size``)."""
    make_vocab_size_divisible_by: int = 128
    overhead_gib: float = 4.0

    def problems(self, models: Sequence[ModelConfig]) -> list[str]:
        out = []
        for name in ("tp", "pp", "dp", "ep", "micro_batch_size", "seq_length", "kd_chunk_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if out:
            return out
        if self.sequence_parallel and self.tp == 1:
            out.append("--sequence-parallel needs --tp > 1")
        if self.dp % self.ep:
            out.append(
                f"--ep {self.ep} must divide --dp {self.dp} (expert parallelism is carved out of data "
                "parallelism: EP x TP x PP divides the GPUs)"
            )
        if self.global_batch_size is not None and self.global_batch_size % (self.micro_batch_size * self.dp):
            out.append(
                f"--global-batch-size {self.global_batch_size} is not a multiple of --micro-batch-size "
                f"{self.micro_batch_size} x --dp {self.dp}"
            )
        for model, role in zip(models, ("teacher", "student")[-len(models) :]):
            if model.num_layers % self.pp:
                out.append(f"--pp {self.pp} does not divide the {role}'s {model.num_layers} layers")
            if model.num_attention_heads % self.tp or model.query_groups % self.tp:
                out.append(
                    f"--tp {self.tp} does not divide the {role}'s {model.num_attention_heads} attention "
                    f"heads / {model.query_groups} key-value groups"
                )
            if model.is_moe and model.num_experts % self.ep:
                out.append(f"--ep {self.ep} does not divide the {role}'s {model.num_experts} experts")
        return out

    def in_flight(self, stage: int) -> int:
        """Micro-batches whose activations a stage holds at the 1F1B peak (PP - stage, warm-up included)."""
        if self.pp == 1:
            return 1
        wanted = self.pp - stage
        if self.global_batch_size is None:
            return wanted
        return min(wanted, self.global_batch_size // (self.micro_batch_size * self.dp))


@dataclass(frozen=True)
class Component:
    name: str
    bytes: float
    note: str


@dataclass(frozen=True)
class Estimate:
    stage: int
    components: tuple[Component, ...]

    @property
    def total(self) -> float:
        return sum(c.bytes for c in self.components)

    def by_name(self, name: str) -> float:
        return sum(c.bytes for c in self.components if c.name == name)


# ----------------------------------------------------------------------------------- parameters


def stage_parameters(
    model: ModelConfig, *, tp: int, pp: int, stage: int, make_vocab_size_divisible_by: int = 128, ep: int = 1
) -> int:
    """Parameters one GPU of pipeline ``stage`` holds (embedding rows padded the way Megatron pads)."""
    h = model.hidden_size
    vocab = padded_vocab_size(model.vocab_size, tp, make_vocab_size_divisible_by)
    total = (model.num_layers // pp) * model.layer_parameters(tp, ep)
    first, last = stage == 0, stage == pp - 1
    if first:
        total += vocab * h // tp
        if model.position_embedding_type == "learned_absolute":
            total += model.max_position_embeddings * h
    if last:
        total += h * (2 if model.normalization == "LayerNorm" else 1)  # final norm
        if model.untie_embeddings_and_output_weights or not first:
            total += vocab * h // tp  # output layer (a tied copy lives on the last stage when PP > 1)
    return total


# ---------------------------------------------------------------------------------- activations


def layer_activation_bytes(model: ModelConfig, layout: Layout, *, element_bytes: int = 2) -> float:
    """Bytes one transformer layer keeps for backward, per micro-batch, on one TP rank.

    Pre-norm layer, no dropout (the paper's setups use none), no recomputation:
      4 s b h       inputs and outputs of the two norms (split over TP only with sequence parallel)
      s b (q + 2kv) the rotated Q, K, V attention reads again in backward          (/TP)
      s b q         attention output = input of the output projection              (/TP)
      s b 3f        SwiGLU: gate and up (fc1 output) and their product (fc2 input) (/TP); GELU: 2f
    MoE: each token's k expert copies go through a SwiGLU of width Fe (3 k Fe, /TP) plus the shared
    expert (3 Fs, /TP), and the dispatcher keeps the k permuted inputs and outputs (2 k h) and the
    fp32 router probabilities (E); on average a rank's experts receive its own share of tokens.
    plus fp32 softmax statistics (flash) or the bf16 [s, s] probabilities per head (unfused).
    """
    s, b, t = layout.seq_length, layout.micro_batch_size, layout.tp
    h, d, f = model.hidden_size, model.head_dim, model.ffn_hidden_size
    heads, q, kv = (
        model.num_attention_heads,
        model.num_attention_heads * model.head_dim,
        2 * model.query_groups * d,
    )
    replicated = 4 * h / (t if layout.sequence_parallel else 1)
    width = 3 if model.swiglu else 2
    if model.is_moe:
        k = model.moe_router_topk
        mlp = width * (k * model.expert_ffn_hidden_size + (model.moe_shared_expert_intermediate_size or 0))
        replicated += 2 * k * h + model.num_experts * 4 / element_bytes
    else:
        mlp = width * f
    sharded = ((q + kv) + q + mlp) / t
    total = s * b * (replicated + sharded) * element_bytes
    if layout.flash_attention:
        total += s * b * heads / t * 4  # log-sum-exp per query and head, fp32
    else:
        total += heads / t * s * s * b * element_bytes
    return total


def kd_chunk_tokens(layout: Layout, vocab_columns: int) -> int:
    """The KD loss's tokens per chunk, defaulting the way pretrain_ddk.py does."""
    return layout.kd_chunk_size or default_chunk_size(vocab_columns)


def logits_bytes(vocab_columns: int, layout: Layout, *, with_teacher: bool, element_bytes: int) -> float:
    """Last stage, one micro-batch: logits, the loss's saved tensors and its transients."""
    n = layout.seq_length * layout.micro_batch_size * vocab_columns  # elements of one [s, b, V/TP] tensor
    # student logits, the fp32 softmax vocab-parallel CE saves, and one more fp32 [s, b, V/TP] buffer: the
    # teacher CE's fp32 copy in forward, the logits gradient in backward (an upper bound for both phases)
    per_element = element_bytes + 4 + 4
    chunk_workspace = 0.0
    if with_teacher:
        per_element += 2 + element_bytes  # teacher logits (bf16), the KD gradient stored by the chunked loss
        chunk_workspace = (
            4
            * min(kd_chunk_tokens(layout, vocab_columns), layout.seq_length * layout.micro_batch_size)
            * vocab_columns
            * 4
        )  # four fp32 [chunk, V/TP] buffers
    return n * per_element + chunk_workspace


# ------------------------------------------------------------------------------------ estimates


def estimate_stage(teacher: ModelConfig | None, student: ModelConfig, layout: Layout, stage: int) -> Estimate:
    t, pp = layout.tp, layout.pp
    elem = 2 if layout.bf16 else 4
    div = layout.make_vocab_size_divisible_by
    p_student = stage_parameters(
        student, tp=t, pp=pp, stage=stage, make_vocab_size_divisible_by=div, ep=layout.ep
    )
    optimizer_per_param = 12 if layout.bf16 else 8
    optimizer_dp = layout.dp if layout.use_distributed_optimizer else 1
    in_flight = layout.in_flight(stage)
    parts = []
    if teacher is not None:
        p_teacher = stage_parameters(
            teacher, tp=t, pp=pp, stage=stage, make_vocab_size_divisible_by=div, ep=layout.ep
        )
        parts.append(
            Component("teacher weights", 2 * p_teacher, f"{p_teacher / 1e9:.3f}B params, bf16, frozen")
        )
    parts += [
        Component(
            "student weights",
            elem * p_student,
            f"{p_student / 1e9:.3f}B params, {'bf16' if layout.bf16 else 'fp32'}",
        ),
        Component("student grads", 4 * p_student, "fp32 main grads (DDP buffer)"),
        Component(
            "optimizer state",
            optimizer_per_param * p_student / optimizer_dp,
            ("fp32 master + Adam m, v" if layout.bf16 else "Adam m, v")
            + (f", sharded over DP={layout.dp}" if layout.use_distributed_optimizer else ", replicated"),
        ),
    ]
    layers = student.num_layers // pp
    per_layer = layer_activation_bytes(student, layout, element_bytes=elem)
    parts.append(
        Component(
            "activations",
            per_layer * layers * in_flight,
            f"{layers} layers x {in_flight} micro-batch(es) x {per_layer / 2**20:.0f} MiB",
        )
    )
    if pp > 1:
        hidden = student.hidden_size + (teacher.hidden_size if teacher is not None else 0)
        tokens = layout.seq_length * layout.micro_batch_size / (t if layout.sequence_parallel else 1)
        parts.append(
            Component(
                "pipeline buffers",
                2 * in_flight * tokens * hidden * elem,
                "received + sent [student | teacher] hidden states",
            )
        )
    if teacher is not None:
        parts.append(
            Component(
                "teacher working set",
                layer_activation_bytes(teacher, layout, element_bytes=2),
                "one teacher layer (no_grad)",
            )
        )
    if stage == pp - 1:
        rows = padded_vocab_size(student.vocab_size, t, div)
        if teacher is not None:  # the run pads the student's vocabulary to the teacher's logits width
            rows = max(rows, padded_vocab_size(teacher.vocab_size, t, div))
        columns = rows // t
        parts.append(
            Component(
                "logits and KD loss",
                logits_bytes(columns, layout, with_teacher=teacher is not None, element_bytes=elem),
                f"[s, b, {columns}] per TP rank, KD chunk {kd_chunk_tokens(layout, columns)}",
            )
        )
    parts.append(Component("allowance", layout.overhead_gib * GIB, "CUDA context, NCCL, fragmentation"))
    return Estimate(stage, tuple(parts))


def estimate(teacher: ModelConfig | None, student: ModelConfig, layout: Layout) -> Estimate:
    """The estimate of the pipeline stage that needs the most memory."""
    problems = layout.problems([m for m in (teacher, student) if m is not None])
    if problems:
        raise EstimateError("; ".join(problems))
    return max(
        (estimate_stage(teacher, student, layout, stage) for stage in range(layout.pp)), key=lambda e: e.total
    )


def valid_layouts(
    teacher: ModelConfig | None, student: ModelConfig, *, num_gpus: int, gpus_per_node: int = 8
) -> list[tuple[int, int]]:
    """(TP, PP) pairs that divide the models and the GPUs; TP stays inside a node (NVLink)."""
    models = [m for m in (teacher, student) if m is not None]
    pairs = []
    for tp in (t for t in range(1, gpus_per_node + 1) if gpus_per_node % t == 0):
        for pp in range(1, num_gpus // tp + 1):
            if num_gpus % (tp * pp):
                continue
            if all(
                m.num_layers % pp == 0 and m.num_attention_heads % tp == 0 and m.query_groups % tp == 0
                for m in models
            ):
                pairs.append((tp, pp))
    return pairs


# ------------------------------------------------------------------------------------- printing


def format_estimate(result: Estimate, layout: Layout, *, gpu_memory_gib: float) -> str:
    width = max(len(c.name) for c in result.components)
    lines = [
        f"per-GPU memory, TP={layout.tp} PP={layout.pp} DP={layout.dp} EP={layout.ep}, micro-batch {layout.micro_batch_size} x "
        f"seq {layout.seq_length}, pipeline stage {result.stage} (the largest of {layout.pp})",
        f"{'component':<{width}}  {'GiB':>8}  note",
        f"{'-' * width}  {'-' * 8}  {'-' * 40}",
    ]
    lines += [f"{c.name:<{width}}  {c.bytes / GIB:8.2f}  {c.note}" for c in result.components]
    fits = result.total <= gpu_memory_gib * GIB
    lines += [
        f"{'-' * width}  {'-' * 8}",
        f"{'total':<{width}}  {result.total / GIB:8.2f}  "
        f"{'fits' if fits else 'does NOT fit'} in {gpu_memory_gib:g} GiB",
    ]
    return "\n".join(lines)


def format_sweep(
    teacher: ModelConfig | None,
    student: ModelConfig,
    base: Layout,
    *,
    num_gpus: int,
    gpus_per_node: int,
    gpu_memory_gib: float,
) -> str:
    columns = (
        "teacher weights",
        "student weights",
        "student grads",
        "optimizer state",
        "activations",
        "logits and KD loss",
    )
    short = ("teacher", "s.weights", "s.grads", "optim", "activ", "logits")
    header = (
        f"{'TP':>3} {'PP':>3} {'DP':>4}  " + " ".join(f"{c:>9}" for c in short) + f"  {'total GiB':>9}  fits"
    )
    lines = [
        f"sweep over {num_gpus} GPUs ({gpus_per_node} per node), micro-batch {base.micro_batch_size} x seq "
        f"{base.seq_length}, distributed optimizer {'on' if base.use_distributed_optimizer else 'off'}, "
        f"limit {gpu_memory_gib:g} GiB (worst stage, GiB)",
        header,
        "-" * len(header),
    ]
    for tp, pp in valid_layouts(teacher, student, num_gpus=num_gpus, gpus_per_node=gpus_per_node):
        layout = replace(
            base, tp=tp, pp=pp, dp=num_gpus // (tp * pp), sequence_parallel=base.sequence_parallel and tp > 1
        )
        if layout.dp % layout.ep:
            continue
        if layout.problems([m for m in (teacher, student) if m is not None]):
            continue
        result = estimate(teacher, student, layout)
        cells = " ".join(f"{result.by_name(c) / GIB:9.2f}" for c in columns)
        fits = "yes" if result.total <= gpu_memory_gib * GIB else "no"
        lines.append(f"{tp:>3} {pp:>3} {layout.dp:>4}  {cells}  {result.total / GIB:9.2f}  {fits}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI


def parse_shape(text: str, flag: str) -> dict[str, object]:
    """``num_layers=24,hidden_size=2048,...`` -> ModelConfig field values."""
    known = {f.name: f for f in fields(ModelConfig)}
    values: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or key not in known:
            raise EstimateError(
                f"{flag}: {item!r} is not NAME=VALUE with NAME one of {', '.join(sorted(known))}"
            )
        if raw.lower() in ("true", "false"):
            values[key] = raw.lower() == "true"
        elif raw.lower() == "none":
            values[key] = None
        else:
            try:
                values[key] = int(raw)
            except ValueError:
                try:
                    values[key] = float(raw)
                except ValueError:
                    values[key] = raw
    return values


def resolve_model(preset: str | None, shape: str | None, role: str) -> ModelConfig | None:
    if preset == "none":
        if shape:
            raise EstimateError(f"--{role} none takes no --{role}-shape")
        return None
    overrides = parse_shape(shape, f"--{role}-shape") if shape else {}
    if preset is None:
        try:
            return ModelConfig(**overrides)
        except TypeError as err:
            raise EstimateError(
                f"--{role}-shape without a preset must give every required field ({err})"
            ) from err
    if preset not in PRESETS:
        raise EstimateError(
            f"--{role} {preset!r} is not a preset; choose one of {', '.join(PRESETS)} or give --{role}-shape"
        )
    return replace(PRESETS[preset], **overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--teacher", default=None, help=f"preset ({', '.join(PRESETS)}) or 'none' (CPT)")
    parser.add_argument("--student", default=None, help="preset name")
    parser.add_argument(
        "--teacher-shape",
        default=None,
        help="ModelConfig fields NAME=VALUE,... (on top of --teacher, or standalone)",
    )
    parser.add_argument("--student-shape", default=None, help="as --teacher-shape, for the student")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1, help="expert parallelism for MoE models (divides --dp)")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--global-batch-size", type=int, default=None)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--use-distributed-optimizer", action="store_true")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument(
        "--fp32", action="store_true", help="fp32 student (default bf16 with fp32 master weights)"
    )
    parser.add_argument(
        "--unfused-attention",
        action="store_true",
        help="keep [s, s] attention probabilities (CPU / no Transformer Engine)",
    )
    parser.add_argument(
        "--kd-chunk-size",
        type=int,
        default=None,
        help="as pretrain_ddk.py's flag (default: 16M logits / vocabulary shard)",
    )
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    parser.add_argument(
        "--overhead-gib",
        type=float,
        default=4.0,
        help="CUDA context, NCCL buffers and allocator fragmentation",
    )
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument(
        "--sweep", action="store_true", help="table of every valid (TP, PP) on --num-gpus GPUs"
    )
    parser.add_argument("--num-gpus", type=int, default=8, help="for --sweep")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="for --sweep (TP stays inside a node)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.student is None and args.student_shape is None:
            raise EstimateError("give --student PRESET or --student-shape NAME=VALUE,...")
        teacher = (
            resolve_model(args.teacher, args.teacher_shape, "teacher")
            if (args.teacher or args.teacher_shape)
            else None
        )
        student = resolve_model(args.student, args.student_shape, "student")
        layout = Layout(
            tp=args.tp,
            pp=args.pp,
            dp=args.dp,
            ep=args.ep,
            micro_batch_size=args.micro_batch_size,
            global_batch_size=args.global_batch_size,
            seq_length=args.seq_length,
            use_distributed_optimizer=args.use_distributed_optimizer,
            sequence_parallel=args.sequence_parallel,
            bf16=not args.fp32,
            flash_attention=not args.unfused_attention,
            kd_chunk_size=args.kd_chunk_size,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            overhead_gib=args.overhead_gib,
        )
        if args.sweep:
            whole_nodes = args.num_gpus <= args.gpus_per_node or args.num_gpus % args.gpus_per_node == 0
            if args.num_gpus < 1 or args.gpus_per_node < 1 or not whole_nodes:
                raise EstimateError(
                    f"--num-gpus {args.num_gpus} must be a multiple of --gpus-per-node "
                    f"{args.gpus_per_node} (or fewer)"
                )
            base = replace(
                layout, tp=1, pp=1, dp=1
            )  # --ep is kept: layouts whose DP it does not divide are skipped
            print(
                format_sweep(
                    teacher,
                    student,
                    base,
                    num_gpus=args.num_gpus,
                    gpus_per_node=min(args.gpus_per_node, args.num_gpus),
                    gpu_memory_gib=args.gpu_memory_gib,
                )
            )
        else:
            print(
                format_estimate(
                    estimate(teacher, student, layout), layout, gpu_memory_gib=args.gpu_memory_gib
                )
            )
    except UserError as err:
        parser.exit(2, f"estimate_memory.py: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
