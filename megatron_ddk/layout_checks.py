"""Shape and layout rules that megatron-core would otherwise enforce late (while building the model, in
its own config words) or never (a sequence longer than the position table): checked before any process
group or model exists, for the student and for the teacher (whose shapes come from its checkpoint),
and reported all together with the flags to change.
"""

from __future__ import annotations

from megatron_ddk.config import ModelConfig, RunConfig
from megatron_ddk.data.tokenizer import padded_vocab_size
from megatron_ddk.errors import ConfigError


def model_layout_problems(
    model: ModelConfig, *, tp: int, pp: int, seq_length: int, sequence_parallel: bool = False, whose: str = ""
) -> list[str]:
    """What ``model`` cannot do at tensor-parallel size ``tp``, pipeline size ``pp`` and ``seq_length``.

    ``whose`` prefixes each rule for the teacher ("the teacher's (--teacher-load X) "); empty for the
    student, whose values are flags."""

    def name(flag: str) -> str:
        return f"{whose}{flag.lstrip('-').replace('-', '_')}" if whose else flag

    problems = []
    if seq_length > model.max_position_embeddings:
        problems.append(
            f"--seq-length {seq_length} exceeds {name('--max-position-embeddings')} "
            f"{model.max_position_embeddings} ({model.position_embedding_type} positions): "
            + ("shorten --seq-length" if whose else "raise --max-position-embeddings or shorten --seq-length")
        )
    for flag, value in (
        ("--num-attention-heads", model.num_attention_heads),
        ("--num-query-groups", model.query_groups),
        ("--ffn-hidden-size", model.ffn_hidden_size),
    ):
        if value % tp:
            problems.append(f"{name(flag)} {value} is not divisible by --tensor-model-parallel-size {tp}")
    if model.make_vocab_size_divisible_by < 1:
        problems.append(
            f"{name('--make-vocab-size-divisible-by')} must be >= 1, got {model.make_vocab_size_divisible_by}"
        )
    elif padded_vocab_size(model.vocab_size, tp, model.make_vocab_size_divisible_by) % tp:
        problems.append(
            f"the padded vocabulary of {model.vocab_size} tokens does not split over "
            f"--tensor-model-parallel-size {tp}; change {name('--make-vocab-size-divisible-by')}"
        )
    if model.num_layers % pp:
        problems.append(
            f"{name('--num-layers')} {model.num_layers} is not divisible by --pipeline-model-parallel-size "
            f"{pp}" + ("; choose a PP size dividing both models' layers" if whose else "")
        )
    if sequence_parallel and not whose and seq_length % tp:
        problems.append(
            f"--seq-length {seq_length} is not divisible by --tensor-model-parallel-size {tp} "
            "(needed by --sequence-parallel)"
        )
    return problems


def layout_problems(
    cfg: RunConfig, teacher: ModelConfig | None = None, *, teacher_source: str = ""
) -> list[str]:
    """Every layout rule for the run's student and, if given, its teacher (pure: reads nothing)."""
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    seq = cfg.data.seq_length
    problems = model_layout_problems(
        cfg.model, tp=tp, pp=pp, seq_length=seq, sequence_parallel=cfg.parallel.sequence_parallel
    )
    if teacher is not None:
        problems += model_layout_problems(
            teacher, tp=tp, pp=pp, seq_length=seq, whose=f"the teacher's ({teacher_source}) "
        )
    return problems


def check_layout(cfg: RunConfig, teacher: ModelConfig | None = None, *, teacher_source: str = "") -> None:
    """Raise one ConfigError listing every layout problem (one per line)."""
    problems = layout_problems(cfg, teacher, teacher_source=teacher_source)
    if problems:
        raise ConfigError("\n".join(problems))
