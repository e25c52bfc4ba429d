"""Checks of the activation-recomputation and context-parallel flags: pure functions, run on the parsed
flags before any process group or model exists; each problem is one line naming the flags to change.

They follow megatron-core's ``TransformerConfig`` rules (which would otherwise fail later, in its own
words, once per rank) and Megatron-LM's argument checks.
"""

from __future__ import annotations


def recompute_problems(
    *,
    granularity: str | None,
    method: str | None,
    num_layers: int | None,
    model_layers: int,
    pipeline_size: int,
) -> list[str]:
    """``--recompute-granularity`` / ``--recompute-method`` / ``--recompute-num-layers`` that contradict
    each other or do not fit the student's layers per pipeline stage."""
    problems: list[str] = []
    per_stage = model_layers // max(pipeline_size, 1)
    if granularity is None:
        if method is not None:
            problems.append(f"--recompute-method {method} needs --recompute-granularity full")
        if num_layers is not None:
            problems.append(f"--recompute-num-layers {num_layers} needs --recompute-granularity full")
        return problems
    if granularity == "selective":
        given = [
            f
            for f, v in (("--recompute-method", method), ("--recompute-num-layers", num_layers))
            if v is not None
        ]
        if given:
            problems.append(
                f"{' and '.join(given)} apply to --recompute-granularity full only; drop them (selective "
                "recomputes the core attention of every layer)"
            )
        return problems
    if method is None:
        problems.append("--recompute-granularity full needs --recompute-method uniform or block")
    if num_layers is None:
        problems.append(
            f"--recompute-granularity full needs --recompute-num-layers N, 1 <= N <= {per_stage} "
            "(the student's layers per pipeline stage)"
        )
    elif not 1 <= num_layers <= per_stage:
        problems.append(
            f"--recompute-num-layers {num_layers} must be between 1 and the student's {per_stage} layers per "
            f"pipeline stage (--num-layers {model_layers} / --pipeline-model-parallel-size {pipeline_size})"
        )
    return problems


def context_parallel_problems(
    *, context_parallel_size: int, tensor_size: int, pipeline_size: int, world_size: int, seq_length: int
) -> list[str]:
    """``--context-parallel-size`` against the sequence length and the number of processes."""
    cp = context_parallel_size
    if cp < 1:
        return [f"--context-parallel-size must be >= 1, got {cp}"]
    if cp == 1:
        return []
    problems = []
    if seq_length % (2 * cp):
        problems.append(
            f"--seq-length {seq_length} must be divisible by 2 x --context-parallel-size {cp} = {2 * cp} "
            "(megatron-core cuts each sequence into 2 x CP chunks to balance the causal attention)"
        )
    model_parallel = tensor_size * pipeline_size * cp
    if tensor_size >= 1 and pipeline_size >= 1 and world_size % model_parallel:
        problems.append(
            f"--tensor-model-parallel-size {tensor_size} x --pipeline-model-parallel-size {pipeline_size} x "
            f"--context-parallel-size {cp} = {model_parallel} must divide the number of processes ({world_size})"
        )
    return problems
