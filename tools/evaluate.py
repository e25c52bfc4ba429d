"""Per-domain evaluation of a checkpoint: student CE / perplexity, and with a teacher its CE and the ratio.

    torchrun --nproc-per-node 2 tools/evaluate.py --load ckpt/student [ckpt/other ...] [--teacher-load ckpt/teacher | --teacher-cache DIR] \\
        --domains domains.yaml --split test [--num-samples 256] --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model tok.model --seq-length 128 [--tensor-model-parallel-size 2] [--output eval.json]

A separate tool rather than ``pretrain_ddk.py --skip-train``: both models' architectures come from their
checkpoints, so no model or training flags are needed, and nothing (optimizer, DDP buffers, sampler) is
built that evaluation does not use. Any TP / PP / DP layout (checkpoints reshard on load); the
validation / test samples are split over DP ranks without overlap. ``--split test`` needs a registry
whose every domain has a test split (``test`` / ``test_fraction``, docs/DATA.md); a ``test`` dataset
that shares a document with the domain's training or validation data is refused. Several ``--load``
checkpoints are evaluated one after the other (the teacher once) and printed side by side. Prints a
table and, with ``--output``, writes the numbers as JSON (atomically): the first student's at the top
level, every student's under ``students``.

``--teacher-cache DIR`` instead of ``--teacher-load``: the teacher's CE of the validation samples comes
from a cache built by ``tools/cache_teacher_logits.py`` (its per-sample CE, exact), so a student can be
scored against a teacher too large to load next to it. The cache must have been built for this
tokenizer, these datasets, ``--seed`` and ``--seq-length`` and hold the samples read (the first
``--num-samples`` of each domain: the tool's ``--val-samples``); it holds no test samples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401
import numpy as np

from megatron_ddk.errors import CheckpointError, ConfigError, DataError, UserError

__all__ = ["build_parser", "evaluate_checkpoint", "format_table", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--load",
        required=True,
        nargs="+",
        help="student checkpoint(s) (a --save directory or one iter_* in it); several: side by side",
    )
    parser.add_argument(
        "--teacher-load", default=None, help="teacher checkpoint: adds teacher CE and the ratio S/T"
    )
    parser.add_argument(
        "--teacher-cache",
        default=None,
        help="teacher cache (tools/cache_teacher_logits.py): the teacher's CE of the validation samples "
        "from the cache, without loading the teacher (--split valid)",
    )
    parser.add_argument("--domains", default=None, help="domain registry (docs/DATA.md)")
    parser.add_argument(
        "--data-path", nargs="+", default=None, help="Megatron's static form (validation only)"
    )
    parser.add_argument("--split", choices=("valid", "test"), default="valid")
    parser.add_argument(
        "--num-samples",
        type=int,
        default=0,
        help="samples per domain (the first N of the split); 0: all of them",
    )
    parser.add_argument(
        "--tokenizer-type", choices=("SentencePieceTokenizer", "HuggingFaceTokenizer"), required=True
    )
    parser.add_argument("--tokenizer-model", required=True)
    parser.add_argument("--seq-length", type=int, required=True)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="evaluate in bf16 (default fp32)")
    parser.add_argument(
        "--seed",
        type=int,
        default=1234,
        help="dataset seed (the sample order of the split; use the training run's --seed)",
    )
    parser.add_argument("--data-cache-path", default=None)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    return parser


def _check_args(args: argparse.Namespace, world_size: int) -> None:
    problems = []
    if (args.domains is None) == (args.data_path is None):
        problems.append("give exactly one of --domains REGISTRY.yaml or --data-path")
    if args.split == "test" and args.domains is None:
        problems.append("--split test needs a --domains registry with a test split per domain (docs/DATA.md)")
    if args.teacher_cache and args.teacher_load:
        problems.append("give at most one of --teacher-load and --teacher-cache")
    if args.teacher_cache and args.split == "test":
        problems.append(
            f"--teacher-cache {args.teacher_cache} holds training and validation samples only; "
            "evaluate --split test with --teacher-load"
        )
    if args.num_samples < 0:
        problems.append(f"--num-samples must be >= 0 (0: all), got {args.num_samples}")
    if args.seq_length < 1 or args.micro_batch_size < 1:
        problems.append("--seq-length and --micro-batch-size must be >= 1")
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    if model_parallel < 1 or world_size % model_parallel:
        problems.append(
            f"--tensor-model-parallel-size x --pipeline-model-parallel-size ({model_parallel}) must "
            f"divide the number of processes ({world_size})"
        )
    if args.output and not Path(args.output).resolve().parent.is_dir():
        problems.append(f"--output {args.output}: its directory does not exist")
    if problems:
        raise ConfigError("; ".join(problems))


def _load_registry(args: argparse.Namespace, vocab_size: int, rank: int):
    from megatron_ddk.data.domains import (
        check_test_documents_disjoint,
        load_domain_registry,
        registry_from_data_path,
        validate_registry,
    )

    registry = load_domain_registry(args.domains) if args.domains else registry_from_data_path(args.data_path)
    if args.split == "test" and not registry.has_test_split:
        missing = [d.name for d in registry.domains if d.test_prefix is None and d.test_fraction <= 0]
        raise DataError(
            f"{registry.source}: domains {missing} have no test split; add 'test: PREFIX' or "
            "'test_fraction: F' to each (docs/DATA.md)"
        )
    validate_registry(registry, vocab_size=vocab_size, scan_token_ids=rank == 0)
    if args.split == "test":
        check_test_documents_disjoint(registry)
    return registry


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """Build the model(s) under the requested layout, evaluate every domain, return the results (all ranks)."""
    from megatron_ddk.checkpointing import load_model_state, read_metadata
    from megatron_ddk.config import ParallelConfig, PrecisionConfig
    from megatron_ddk.data.datasets import build_domain_datasets
    from megatron_ddk.data.tokenizer import build_tokenizer, padded_vocab_size
    from megatron_ddk.ddk import factor
    from megatron_ddk.distill.model import DistillationModel, pipeline_shape_adjuster
    from megatron_ddk.models.gpt import build_gpt_model
    from megatron_ddk.platform import distributed
    from megatron_ddk.training.evaluation import evaluate_domains
    from megatron_ddk.training.step import LossSettings

    world_size = distributed.world_size_from_env()
    _check_args(args, world_size)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    student_metas = [read_metadata(path, flag="--load") for path in args.load]
    teacher_meta = read_metadata(args.teacher_load, flag="--teacher-load") if args.teacher_load else None
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    checked = [(f"--load {path}", meta) for path, meta in zip(args.load, student_metas)]
    for flag, meta in [*checked, ("--teacher-load", teacher_meta)]:
        if meta is None:
            continue
        if meta.model.vocab_size != tokenizer.vocab_size:
            raise ConfigError(
                f"{flag} was trained with a {meta.model.vocab_size}-token vocabulary but "
                f"--tokenizer-model has {tokenizer.vocab_size}; use the run's tokenizer"
            )
        if meta.model.num_layers % pp:
            raise ConfigError(
                f"{flag} has {meta.model.num_layers} layers, not divisible by "
                f"--pipeline-model-parallel-size {pp}"
            )
    rows = {
        padded_vocab_size(m.model.vocab_size, tp, m.model.make_vocab_size_divisible_by)
        for m in [*student_metas, *([teacher_meta] if teacher_meta else [])]
    }
    if len(rows) > 1:
        raise ConfigError(
            "--load and --teacher-load pad their vocabularies differently "
            "(--make-vocab-size-divisible-by); they cannot be evaluated side by side"
        )
    registry = _load_registry(args, tokenizer.vocab_size, distributed.rank_from_env())
    cache = _open_teacher_cache(args, tokenizer, registry) if args.teacher_cache else None

    layout = distributed.ParallelLayout(
        world_size=world_size, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )
    pg = distributed.initialize(layout)
    distributed.set_seed(args.seed, pg)
    pre, post = distributed.is_pp_first_stage(pg), distributed.is_pp_last_stage(pg)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    precision = PrecisionConfig(bf16=args.bf16)
    teacher = None
    if teacher_meta is not None:
        teacher = build_gpt_model(
            teacher_meta.model,
            parallel,
            precision,
            padded_vocab_size=_rows(teacher_meta.model, tp),
            pg=pg,
            pre_process=pre,
            post_process=post,
            initialize_weights=False,
        )
        load_model_state(args.teacher_load, teacher, flag="--teacher-load")
    data_cache = args.data_cache_path or os.path.join(os.path.expanduser("~"), ".cache", "megatron_ddk")
    domains = build_domain_datasets(
        registry, tokenizer=tokenizer, seq_length=args.seq_length, seed=args.seed, cache_dir=data_cache
    )
    sets = [d.test if args.split == "test" else d.valid for d in domains]
    num_samples = args.num_samples or max(len(s) for s in sets)
    cached_ce = (
        None if cache is None else _cached_teacher_ce(cache, args, [len(s) for s in sets], num_samples)
    )
    start = time.time()
    students, ce_teacher, tokens = [], None, None
    for index, (path, meta) in enumerate(zip(args.load, student_metas)):
        student = build_gpt_model(
            meta.model,
            parallel,
            precision,
            padded_vocab_size=_rows(meta.model, tp),
            pg=pg,
            pre_process=pre,
            post_process=post,
            initialize_weights=False,
        )
        load_model_state(path, student, flag="--load")
        model = DistillationModel(student, teacher, pre_process=pre, post_process=post)
        with_teacher = (
            teacher is not None and index == 0
        )  # frozen: its numbers are the same for every student
        evaluation = evaluate_domains(
            model,
            model,
            sets,
            num_samples=num_samples,
            micro_batch_size=args.micro_batch_size,
            seq_length=args.seq_length,
            settings=LossSettings(num_domains=len(sets), vocab_size=tokenizer.vocab_size),
            with_teacher=with_teacher,
            shape_adjuster=pipeline_shape_adjuster(teacher_meta.model.hidden_size)
            if with_teacher and pp > 1
            else None,
            pg=pg,
        )
        if index == 0:
            ce_teacher, tokens = evaluation.ce_teacher, evaluation.tokens
            if cached_ce is not None:
                ce_teacher = _checked_cached_ce(cached_ce, tokens, args.teacher_cache)
        students.append(_student_result(str(path), evaluation.ce_student, ce_teacher, factor))
    first = students[0]
    result = {
        "student": first["student"],
        "teacher": args.teacher_load or args.teacher_cache,
        "teacher_source": "cache" if args.teacher_cache else "checkpoint" if args.teacher_load else None,
        "split": args.split,
        "samples_per_domain": [min(num_samples, len(s)) for s in sets],
        "layout": {
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "data_parallel_size": layout.data_parallel_size,
        },
        "domains": registry.names,
        "tokens": [int(t) for t in tokens],
        "ce_teacher": None if ce_teacher is None else [float(v) for v in ce_teacher],
        "ppl_teacher": None if ce_teacher is None else [float(v) for v in np.exp(ce_teacher)],
        **{k: v for k, v in first.items() if k != "student"},
        "students": students,
        "seconds": time.time() - start,
    }
    return result


def _open_teacher_cache(args: argparse.Namespace, tokenizer, registry):
    """The cache, checked against this evaluation's tokenizer, datasets, seed and sequence length (cheap:
    index, sample plans, shard sizes) before any model is built."""
    from megatron_ddk.distill.teacher_cache import TeacherCache, run_identity

    cache = TeacherCache(args.teacher_cache)
    if cache.domain_names != registry.names:
        raise ConfigError(
            f"--teacher-cache {args.teacher_cache} holds domains {cache.domain_names}, the registry has "
            f"{registry.names}; use the registry the cache was built from"
        )
    expected = run_identity(
        tokenizer=tokenizer, registry=registry, seed=args.seed, seq_length=args.seq_length, temperature=1.0
    )
    del expected["temperature"]  # the cached CE is the labels' CE at temperature 1 whatever the KD's
    cache.check_identity(expected)
    return cache


def _cached_teacher_ce(cache, args: argparse.Namespace, sizes: list[int], num_samples: int) -> list[tuple]:
    """Per domain, the cached (CE sum, tokens) of the first ``num_samples`` validation samples; refuses
    before any model is built if the cache lacks one, naming how many it holds."""
    from megatron_ddk.distill.teacher_source import validation_ce_sums

    wanted = [np.arange(min(num_samples, size)) for size in sizes]
    short = {}
    for d, ids in enumerate(wanted):
        missing = cache.missing("valid", d, ids)
        if missing.size:
            short[cache.domain_names[d]] = int(missing.min())  # the cached prefix
    if short:
        prefix = min(short.values())
        raise CheckpointError(
            f"--teacher-cache {args.teacher_cache} lacks validation samples this evaluation reads "
            f"(cached prefix per domain: {short}); use --num-samples {prefix} or add them with "
            f"tools/cache_teacher_logits.py --output {args.teacher_cache} --val-samples {num_samples} "
            "(the cache's other flags unchanged)"
        )
    return validation_ce_sums(cache, sizes, num_samples)


def _checked_cached_ce(cached: list[tuple], tokens, flag_value: str) -> np.ndarray:
    """Mean cached teacher CE per domain; its token counts must be the evaluation's (same samples, same masks)."""
    counted = np.asarray([t for _, t in cached])
    if not np.array_equal(counted, np.asarray(tokens, dtype=np.float64)):
        raise CheckpointError(
            f"--teacher-cache {flag_value} counts {counted.astype(int).tolist()} validation tokens per domain, "
            f"this evaluation {np.asarray(tokens).astype(int).tolist()}; the cache belongs to other data: rebuild it"
        )
    return np.asarray([total / count for total, count in cached], dtype=np.float64)


def _rows(model, tp: int) -> int:
    from megatron_ddk.data.tokenizer import padded_vocab_size

    return padded_vocab_size(model.vocab_size, tp, model.make_vocab_size_divisible_by)


def _student_result(path: str, ce_student, ce_teacher, factor) -> dict:
    result = {
        "student": path,
        "ce_student": [float(v) for v in ce_student],
        "ppl_student": [float(v) for v in np.exp(ce_student)],
        "ratio": None,
    }
    if ce_teacher is not None:
        ratio = factor.perplexity_ratio(ce_student, ce_teacher)
        result.update(
            ratio=[float(v) for v in ratio], worst_ratio=float(ratio.max()), mean_ratio=float(ratio.mean())
        )
    return result


def format_table(result: dict) -> str:
    """One row per domain (tokens, student ppl, teacher ppl, ratio), then worst and mean ratio; with
    several students, their perplexities and ratios side by side."""
    if len(result.get("students", [])) > 1:
        return _side_by_side(result)
    teacher = result["ratio"] is not None
    header = f"{'domain':>20s} | {'tokens':>8s} | {'student CE':>10s} | {'student ppl':>11s}"
    if teacher:
        header += f" | {'teacher ppl':>11s} | {'ratio S/T':>9s}"
    rule = "-" * len(header)
    rows = [
        f"{result['split']} split, {result['student']}"
        + (f" vs teacher {_teacher_label(result)}" if teacher else ""),
        rule,
        header,
        rule,
    ]
    for i, name in enumerate(result["domains"]):
        row = (
            f"{name:>20s} | {result['tokens'][i]:8d} | {result['ce_student'][i]:10.4f} | "
            f"{result['ppl_student'][i]:11.3f}"
        )
        if teacher:
            row += f" | {result['ppl_teacher'][i]:11.3f} | {result['ratio'][i]:9.3f}"
        rows.append(row)
    rows.append(rule)
    if teacher:
        rows.append(f"worst-domain ratio {result['worst_ratio']:.3f} | mean ratio {result['mean_ratio']:.3f}")
    return "\n".join(rows)


def _side_by_side(result: dict) -> str:
    students, teacher = result["students"], result["ratio"] is not None
    labels = [_label(s["student"]) for s in students]
    if len(set(labels)) < len(labels):  # same directory names: add the parent directory
        labels = [f"{Path(s['student']).resolve().parent.name}/{label}" for s, label in zip(students, labels)]
    width = max(9, *(len(label) for label in labels))
    header = f"{'domain':>20s}" + (f" | {'teacher ppl':>11s}" if teacher else "")
    header += "".join(f" | {label + ' ppl':>{width + 4}s}" for label in labels)
    if teacher:
        header += "".join(f" | {label + ' S/T':>{width + 4}s}" for label in labels)
    rule = "-" * len(header)
    rows = [
        f"{result['split']} split" + (f", teacher {_teacher_label(result)}" if teacher else ""),
        rule,
        header,
        rule,
    ]
    for i, name in enumerate(result["domains"]):
        row = f"{name:>20s}" + (f" | {result['ppl_teacher'][i]:11.3f}" if teacher else "")
        row += "".join(f" | {s['ppl_student'][i]:{width + 4}.3f}" for s in students)
        if teacher:
            row += "".join(f" | {s['ratio'][i]:{width + 4}.3f}" for s in students)
        rows.append(row)
    rows.append(rule)
    if teacher:
        rows += [
            f"{'worst-domain ratio':>20s}"
            + " " * 14
            + " " * (7 + width) * len(students)
            + "".join(f" | {s['worst_ratio']:{width + 4}.3f}" for s in students),
            f"{'mean ratio':>20s}"
            + " " * 14
            + " " * (7 + width) * len(students)
            + "".join(f" | {s['mean_ratio']:{width + 4}.3f}" for s in students),
        ]
    return "\n".join(rows)


def _teacher_label(result: dict) -> str:
    return result["teacher"] + (" (cached CE)" if result.get("teacher_source") == "cache" else "")


def _label(path: str) -> str:
    """A checkpoint's column name: its directory (the --save name), not the iter_* inside it."""
    parts = Path(path).resolve().parts
    return parts[-2] if parts[-1].startswith("iter_") and len(parts) > 1 else parts[-1]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_ddk.platform import distributed
    from megatron_ddk.platform.startup import prepare_process

    rank0 = distributed.rank_from_env() == 0
    try:
        prepare_process()
        result = evaluate_checkpoint(args)
    except UserError as err:
        if os.environ.get("MEGATRON_DDK_TRACEBACK"):
            raise
        if rank0:
            print(f"tools/evaluate.py: error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        else:
            time.sleep(5)  # let rank 0 report before torchrun tears the job down
        return 2
    try:
        if rank0:
            print(format_table(result), flush=True)
            if args.output:
                tmp = Path(args.output).with_name(f".{Path(args.output).name}.tmp")
                tmp.write_text(json.dumps(result, indent=1) + "\n")
                os.replace(tmp, args.output)
    finally:
        distributed.destroy()
    return 0


if __name__ == "__main__":  # dist_checkpointing's loader may spawn processes
    sys.exit(main())
