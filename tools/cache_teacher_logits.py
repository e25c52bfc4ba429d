"""Run the teacher once over the training and validation samples and store its top-k per token (a teacher cache).

    torchrun --nproc-per-node 8 tools/cache_teacher_logits.py --output cache/qwen14b-k32 \\
        --teacher-load ckpt/teacher --tokenizer-type HuggingFaceTokenizer --tokenizer-model TOK \\
        --domains domains.yaml --seq-length 2048 --top-k 24 --tail-samples 8 --micro-batch-size 4 \\
        --tensor-model-parallel-size 2 --bf16 \\
        [--max-samples-per-domain N | --train-iters I --global-batch-size G --ddk-interval K ...]

Which training samples (per domain; validation: the first --val-samples of each domain):
all of them; or the first N the sampler would draw (``--max-samples-per-domain``, any mixture that
reads at most N from a domain is covered); or exactly what a run configuration can draw at most
(``--train-iters`` with ``--global-batch-size``, ``--ddk-interval``, ``--ddk-mode``, ``--ddk-mixing``,
``--ddk-alpha``, ``--seed``: exact for static mixtures, a bound for DDK; see data/coverage.py).

The teacher runs at any TP/PP/DP (DP ranks take different shards). Rerunning the same command
after a kill keeps and verifies the finished shards and computes the rest: the result is
byte-identical to an uninterrupted run. Rerunning it with a larger selection adds the missing
samples as new shards. The cache records its identity and refuses to be extended by another
teacher, tokenizer, dataset, seed, sequence length, k, tail samples, temperature or precision.

``--tail-samples S`` also stores S tokens per position drawn from the teacher's tail (outside the
top-k), which makes KD from the cache an unbiased estimate of full forward KL instead of a top-k
approximation (``--kd-loss-type forward_kl`` only); see docs/TEACHER_CACHE.md for which k and S.
Format: megatron_ddk/distill/teacher_cache.py; guide: docs/TEACHER_CACHE.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

import _bootstrap  # noqa: F401
import numpy as np
import torch

from megatron_ddk.config import DDK_MODES, FP8_FORMATS, FP8_RECIPES, MIXING_MODES
from megatron_ddk.errors import UserError

DEFAULT_SHARD_SIZE = 256


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cache_teacher_logits.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--output", required=True, help="cache directory (created, or resumed / extended)")
    p.add_argument("--teacher-load", required=True, help="teacher checkpoint (any TP/PP: resharded on load)")
    p.add_argument(
        "--tokenizer-type", choices=("SentencePieceTokenizer", "HuggingFaceTokenizer"), required=True
    )
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--domains", default=None, help="domain registry (YAML/JSON), as for pretrain_ddk.py")
    p.add_argument(
        "--data-path", nargs="+", default=None, help="Megatron's static form: W1 PREFIX1 W2 PREFIX2 ..."
    )
    p.add_argument("--data-cache-path", default=None, help="where GPTDataset index caches go")
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument(
        "--seed", type=int, default=1234, help="the training run's --seed (dataset shuffle and sampler)"
    )
    p.add_argument("--top-k", type=int, default=24, help="the teacher's most likely tokens kept per position")
    p.add_argument(
        "--tail-samples",
        type=int,
        default=8,
        help="tokens drawn from the rest of the teacher's distribution per position: KD from the cache is "
        "then an unbiased estimate of full forward KL (0: the top-k and one tail bucket, for reverse KL / "
        "JSD); see docs/TEACHER_CACHE.md",
    )
    p.add_argument(
        "--kd-temperature", type=float, default=1.0, help="the temperature the log-probabilities are at"
    )
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard file")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument(
        "--bf16", action="store_true", help="teacher forward in bf16 (as --teacher-bf16 in training)"
    )
    p.add_argument(
        "--fp8-format", choices=FP8_FORMATS, default=None, help="teacher GEMMs in FP8 (needs TE and Hopper)"
    )
    p.add_argument("--fp8-recipe", choices=FP8_RECIPES, default="delayed")
    p.add_argument("--fp8-amax-history-len", type=int, default=1024)
    p.add_argument("--fp8-amax-compute-algo", choices=("max", "most_recent"), default="max")
    g = p.add_argument_group("which training samples (default: all)")
    g.add_argument("--max-samples-per-domain", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=None, help="cache what this run configuration can draw")
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--ddk-interval", type=int, default=1000)
    g.add_argument("--ddk-mode", choices=DDK_MODES, default="ddk")
    g.add_argument("--ddk-mixing", choices=MIXING_MODES, default="ddk")
    g.add_argument("--ddk-alpha", type=float, default=0.5)
    p.add_argument(
        "--val-samples", type=int, default=500, help="validation samples per domain (--ddk-val-samples)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    return p


def check_args(args: argparse.Namespace, world_size: int) -> list[str]:
    problems = []
    if (args.domains is None) == (not args.data_path):
        problems.append("give exactly one of --domains REGISTRY.yaml or --data-path [W1] PREFIX1 ...")
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    if model_parallel < 1 or world_size % model_parallel:
        problems.append(
            f"--tensor-model-parallel-size x --pipeline-model-parallel-size ({model_parallel}) must "
            f"divide the number of processes ({world_size})"
        )
    for name in ("seq_length", "top_k", "micro_batch_size", "shard_size", "val_samples", "ddk_interval"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.kd_temperature > 0:
        problems.append(f"--kd-temperature must be > 0, got {args.kd_temperature}")
    if args.tail_samples < 0:
        problems.append(f"--tail-samples must be >= 0, got {args.tail_samples}")
    if args.max_samples_per_domain is not None and args.train_iters is not None:
        problems.append("give --max-samples-per-domain or --train-iters (a run configuration), not both")
    if args.max_samples_per_domain is not None and args.max_samples_per_domain < 0:
        problems.append(f"--max-samples-per-domain must be >= 0, got {args.max_samples_per_domain}")
    if args.train_iters is not None and (
        args.train_iters < 1 or not args.global_batch_size or args.global_batch_size < 1
    ):
        problems.append("--train-iters needs --global-batch-size (both >= 1): the run whose draws are cached")
    if args.fp8_format is not None and not args.bf16:
        problems.append("--fp8-format needs --bf16 (FP8 GEMMs with bf16 everywhere else)")
    return problems


def selection(args: argparse.Namespace, registry, domains) -> dict[tuple[str, int], np.ndarray]:
    """The sample ids to cache, per (split, domain)."""
    from megatron_ddk.data.coverage import RunDraws, first_samples, samples_a_run_can_draw

    sizes = [len(d.train) for d in domains]
    if args.train_iters is not None:
        run = RunDraws(
            train_iters=args.train_iters,
            global_batch_size=args.global_batch_size,
            interval=args.ddk_interval,
            seed=args.seed,
            mode=args.ddk_mode,
            mixing=args.ddk_mixing,
            alpha=args.ddk_alpha,
        )
        train, _ = samples_a_run_can_draw(sizes, registry.initial_weights, run)
    elif args.max_samples_per_domain is not None:
        train = first_samples(sizes, args.seed, args.max_samples_per_domain)
    else:
        train = [np.arange(size, dtype=np.int64) for size in sizes]
    chosen = {("train", d): ids for d, ids in enumerate(train)}
    for d, domain in enumerate(domains):
        chosen[("valid", d)] = np.arange(min(args.val_samples, len(domain.valid)), dtype=np.int64)
    return chosen


def check_existing(output: Path, *, identity: dict, layout) -> dict:
    """The index of the cache already in ``output``, refused if it has another identity or layout."""
    from megatron_ddk.distill import teacher_cache as tc
    from megatron_ddk.errors import CheckpointError

    index = tc.read_index(output, flag="--output")
    problems = tc.identity_differences(index["identity"], identity)
    if problems:
        raise CheckpointError(
            f"--output {output} holds a cache built for {'; '.join(problems)}; "
            "write this one to another --output directory"
        )
    if index["layout"] != layout.to_json():
        raise CheckpointError(
            f"--output {output} holds a cache with layout {index['layout']}, not "
            f"{layout.to_json()}; write this one to another --output directory"
        )
    return index


def prepare_index(
    output: Path, *, identity: dict, layout, domains, chosen, shard_size: int, built_with: dict
) -> dict:
    """Open (identity checked) or create the index and extend its plans with the samples it lacks (rank 0)."""
    from megatron_ddk.distill import teacher_cache as tc

    output.mkdir(parents=True, exist_ok=True)
    for leftover in (output / "shards").glob("*.tmp*"):
        leftover.unlink()  # a killed run's unfinished writes: never referenced
    if (output / tc.INDEX_FILENAME).exists():
        index = check_existing(output, identity=identity, layout=layout)
    else:
        index = {
            "format": tc.FORMAT,
            "format_version": tc.FORMAT_VERSION,
            "identity": identity,
            "layout": layout.to_json(),
            "plans": {},
            "shards": [],
            "domains": [
                {"name": d.name, "train_samples": len(d.train), "valid_samples": len(d.valid)}
                for d in domains
            ],
        }
    index["built_with"] = built_with
    (output / "shards").mkdir(exist_ok=True)
    for (split, domain), wanted in sorted(chosen.items()):
        key = f"{split}-d{domain:03d}"
        plan_file = tc.plan_name(split, domain)
        planned = (
            np.load(output / plan_file, allow_pickle=False)
            if key in index["plans"]
            else np.zeros(0, np.int64)
        )
        new = np.setdiff1d(wanted, planned)
        if new.size == 0:
            continue
        numbers = [s for s in index["shards"] if s["split"] == split and s["domain"] == domain]
        for start in range(0, new.size, shard_size):
            index["shards"].append(
                {
                    "file": tc.shard_name(split, domain, len(numbers)),
                    "split": split,
                    "domain": domain,
                    "start": int(planned.size + start),
                    "stop": int(planned.size + min(start + shard_size, new.size)),
                    "sha256": None,
                }
            )
            numbers.append(None)
        plan = np.concatenate([planned, new]).astype(np.int64)
        with open(output / plan_file, "wb") as handle:  # np.save's header is plain text; no pickle
            np.save(handle, plan, allow_pickle=False)
        index["plans"][key] = {
            "file": plan_file,
            "count": int(plan.size),
            "sha256": tc.file_sha256(output / plan_file),
        }
    tc.write_index(output, index)
    return index


def finished(output: Path, shard: dict, layout) -> str | None:
    """The shard's checksum when its file is complete and matches it (a kept shard), else None."""
    from megatron_ddk.distill import teacher_cache as tc

    path = output / shard["file"]
    sidecar = path.with_name(path.name + ".sha256")
    if not path.exists() or not sidecar.exists():
        return None
    if path.stat().st_size != layout.shard_bytes(shard["stop"] - shard["start"]):
        return None
    recorded = sidecar.read_text().strip()
    return recorded if tc.file_sha256(path) == recorded else None


def run(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from megatron_ddk.checkpointing import load_model_state, read_metadata
    from megatron_ddk.config import ParallelConfig, PrecisionConfig
    from megatron_ddk.data.datasets import build_domain_datasets
    from megatron_ddk.data.domains import load_domain_registry, registry_from_data_path, validate_registry
    from megatron_ddk.data.tokenizer import build_tokenizer, padded_vocab_size
    from megatron_ddk.distill import teacher_cache as tc
    from megatron_ddk.errors import CheckpointError
    from megatron_ddk.models.gpt import build_gpt_model, check_fp8_supported
    from megatron_ddk.platform import distributed
    from megatron_ddk.platform.startup import prepare_process

    prepare_process()
    world = distributed.world_size_from_env()
    problems = check_args(args, world)
    if problems:
        raise UserError("; ".join(problems))
    # ---- cheap checks first
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    registry = load_domain_registry(args.domains) if args.domains else registry_from_data_path(args.data_path)
    validate_registry(
        registry, vocab_size=tokenizer.vocab_size, scan_token_ids=distributed.rank_from_env() == 0
    )
    meta = read_metadata(args.teacher_load, flag="--teacher-load")
    teacher_tok = meta.tokenizer or {}
    if teacher_tok.get("sha256") and teacher_tok["sha256"] != tokenizer.sha256:
        raise CheckpointError(
            f"--teacher-load {args.teacher_load} was trained with another tokenizer than "
            f"--tokenizer-model {args.tokenizer_model}; give the teacher's tokenizer"
        )
    if meta.model.num_layers % args.pipeline_model_parallel_size:
        raise UserError(
            f"the teacher's {meta.model.num_layers} layers are not divisible by "
            f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}"
        )
    if args.top_k > tokenizer.vocab_size:
        raise UserError(f"--top-k {args.top_k} exceeds the vocabulary ({tokenizer.vocab_size} tokens)")
    if args.tail_samples and args.top_k >= tokenizer.vocab_size:
        raise UserError(
            f"--tail-samples {args.tail_samples} with --top-k {args.top_k}: the top-k covers the whole "
            f"vocabulary ({tokenizer.vocab_size} tokens), there is no tail to sample; give --tail-samples 0"
        )
    precision = PrecisionConfig(
        bf16=args.bf16,
        fp8_format=args.fp8_format,
        fp8_recipe=args.fp8_recipe,
        fp8_amax_history_len=args.fp8_amax_history_len,
        fp8_amax_compute_algo=args.fp8_amax_compute_algo,
    )
    check_fp8_supported(precision)
    layout = tc.CacheLayout.for_vocabulary(
        seq_length=args.seq_length,
        top_k=args.top_k,
        vocab_size=tokenizer.vocab_size,
        tail_samples=args.tail_samples,
    )
    identity = {
        **tc.run_identity(
            tokenizer=tokenizer,
            registry=registry,
            seed=args.seed,
            seq_length=args.seq_length,
            temperature=args.kd_temperature,
        ),
        "teacher": tc.checkpoint_identity(args.teacher_load),
        "top_k": args.top_k,
        "precision": {"bf16": args.bf16, "fp8_format": args.fp8_format},
        "tail_samples": args.tail_samples,
    }
    if (Path(args.output) / tc.INDEX_FILENAME).exists():  # refused before any process group or dataset
        check_existing(Path(args.output), identity=identity, layout=layout)

    parallel = ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
    )
    pg = distributed.initialize(
        distributed.ParallelLayout(
            world_size=world,
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        )
    )
    distributed.set_seed(args.seed, pg)
    cache_dir = args.data_cache_path or str(Path(args.output) / "data_cache")
    domains = build_domain_datasets(
        registry, tokenizer=tokenizer, seq_length=args.seq_length, seed=args.seed, cache_dir=cache_dir
    )
    chosen = selection(args, registry, domains)
    output = Path(args.output)
    built_with = {
        "teacher_load": str(args.teacher_load),
        "tokenizer_type": args.tokenizer_type,
        "tokenizer_model": str(args.tokenizer_model),
        "domains": args.domains,
        "data_path": args.data_path,
        "seq_length": args.seq_length,
        "seed": args.seed,
        "top_k": args.top_k,
        "tail_samples": args.tail_samples,
        "kd_temperature": args.kd_temperature,
    }
    failure = None
    if distributed.is_rank_0():
        try:
            prepare_index(
                output,
                identity=identity,
                layout=layout,
                domains=domains,
                chosen=chosen,
                shard_size=args.shard_size,
                built_with=built_with,
            )
        except UserError as err:
            failure = err
    failed = _any_rank(failure is not None)
    if failure is not None:
        raise failure
    if failed:
        raise UserError("rank 0 could not prepare the cache index (see its error)")
    index = tc.read_index(output, flag="--output")
    plans = {key: np.load(output / plan["file"], allow_pickle=False) for key, plan in index["plans"].items()}

    # ---- finished shards are kept (rank 0 checks them); the rest is shared out over DP
    done = torch.zeros(len(index["shards"]))
    if distributed.is_rank_0():
        done = torch.tensor(
            [finished(output, shard, layout) is not None for shard in index["shards"]]
        ).float()
    pending = [n for n, flag in enumerate(_from_rank_0(done).tolist()) if not flag]
    dp_rank, dp_size = dist.get_rank(pg.dp), dist.get_world_size(pg.dp)
    mine = pending[dp_rank::dp_size]
    writer = distributed.is_pp_last_stage(pg) and dist.get_rank(pg.tp) == 0
    kept = len(index["shards"]) - len(pending)
    distributed_print(
        f"teacher cache {output}: {len(index['shards'])} shards, {kept} finished and verified, "
        f"{len(pending)} to compute on {dp_size} data-parallel group(s); "
        f"{layout.bytes_per_token():.1f} bytes/token (k={args.top_k}"
        f"{f' + {args.tail_samples} tail samples' if args.tail_samples else ''}, ids {layout.id_dtype})"
    )

    teacher = build_gpt_model(
        meta.model,
        parallel,
        precision,
        pg=pg,
        pre_process=distributed.is_pp_first_stage(pg),
        post_process=distributed.is_pp_last_stage(pg),
        use_fp8=args.fp8_format is not None,
        initialize_weights=False,
        padded_vocab_size=padded_vocab_size(
            meta.model.vocab_size,
            parallel.tensor_model_parallel_size,
            meta.model.make_vocab_size_divisible_by,
        ),
    )
    from megatron_ddk.distill.model import freeze

    load_model_state(args.teacher_load, teacher, flag="--teacher-load")
    freeze(teacher)
    tokens_total = (
        sum((index["shards"][n]["stop"] - index["shards"][n]["start"]) for n in mine) * args.seq_length
    )
    bar = _progress(tokens_total, enabled=writer and dp_rank == 0 and not args.no_progress, dp_size=dp_size)
    start = time.time()
    for number in mine:
        shard = index["shards"][number]
        split, domain = shard["split"], shard["domain"]
        samples = plans[f"{split}-d{domain:03d}"][shard["start"] : shard["stop"]]
        dataset = getattr(domains[domain], split)
        arrays = teacher_rows(teacher, dataset, samples, args=args, vocab_size=tokenizer.vocab_size, pg=pg)
        if writer:
            tc.write_shard(output / shard["file"], layout, arrays)
            bar.update(len(samples) * args.seq_length)
    bar.close()
    elapsed = time.time() - start
    torch.distributed.barrier()  # every rank's shards are written before rank 0 indexes them
    if distributed.is_rank_0():
        for shard in index["shards"]:
            checksum = finished(output, shard, layout)
            if checksum is None:
                raise CheckpointError(
                    f"shard {output / shard['file']} was not completed; rerun the same command"
                )
            shard["sha256"] = checksum
        tc.write_index(output, index)
    torch.distributed.barrier()  # the index is published before any rank reports completion
    done = tokens_total * dp_size
    distributed_print(
        f"teacher cache {output}: complete ({len(index['shards'])} shards); computed about {done} "
        f"tokens in {elapsed:.1f}s ({done / max(elapsed, 1e-9):.0f} tokens/s over all ranks)"
    )
    distributed.destroy()


def micro_batches(rows: list[dict], micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Collated micro-batches of dataset samples; the last one is padded with its first row (``valid_rows`` says
    how many are real)."""
    from megatron_ddk.data.loader import collate

    batches = []
    for first in range(0, len(rows), micro_batch_size):
        chunk = rows[first : first + micro_batch_size]
        batch = collate(chunk + [chunk[0]] * (micro_batch_size - len(chunk)))
        batch["valid_rows"] = torch.tensor(len(chunk))
        batches.append(batch)
    return batches


def teacher_forward(
    teacher, batches: list[dict], *, seq_length: int, micro_batch_size: int, pg, on_logits
) -> list:
    """The teacher's forward-only pass over ``batches`` (megatron-core's schedule, any PP); on the last
    stage ``on_logits(batch, logits [b, s, v_local])`` runs per micro-batch and its results are returned."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ddk.platform.distributed import is_pp_last_stage
    from megatron_ddk.training.step import move_batch

    def forward_step(data_iterator, model):
        batch = move_batch(next(data_iterator))
        logits = model(batch["tokens"], batch["position_ids"], None)
        if not is_pp_last_stage(pg):
            return logits, None
        return logits, lambda output, non_loss_data=True: on_logits(batch, output)

    with torch.no_grad():
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[teacher],
            num_microbatches=len(batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
            collect_non_loss_data=True,
        )


def extract_fields(
    batch: dict[str, torch.Tensor],
    logits: torch.Tensor,
    *,
    top_k: int,
    temperature: float,
    vocab_size: int,
    tp_group,
    tail_samples: int = 0,
) -> dict[str, torch.Tensor]:
    """One micro-batch's cached fields from the teacher's ``[b, s, v_local]`` logits (its real rows only).

    The top-k, tail (and tail samples) and CE come from one set of passes over the logits
    (``vocab_parallel_topk_and_ce``); the tail draws are seeded by each row's text (``tail_draws``).
    """
    from megatron_ddk.distill.teacher_cache import tail_draws
    from megatron_ddk.distill.topk_kd_loss import vocab_parallel_topk_and_ce

    b, s, v = logits.shape
    draws = None
    if tail_samples:
        tokens, labels = batch["tokens"].cpu().numpy(), batch["labels"].cpu().numpy()
        draws = torch.from_numpy(np.concatenate([tail_draws(tokens[r], labels[r], s) for r in range(b)]))
    ids, logp, tail, ce = vocab_parallel_topk_and_ce(
        logits.reshape(b * s, v),
        top_k,
        labels=batch["labels"],
        temperature=temperature,
        vocab_size=vocab_size,
        tp_group=tp_group,
        tail_samples=tail_samples,
        draws=draws,
    )
    ce = ce.reshape(b, s)
    mask = batch["loss_mask"].double()
    keep = int(batch["valid_rows"])
    return {
        "ids": ids.reshape(b, s, -1)[:keep].cpu(),
        "log_probs": logp.reshape(b, s, -1)[:keep].cpu(),
        "tail": tail.reshape(b, s)[:keep].cpu(),
        "ce_sum": (ce.double() * mask).sum(1)[:keep].cpu(),
        "ce_tokens": mask.sum(1)[:keep].long().cpu(),
    }


def teacher_rows(
    teacher, dataset, samples: np.ndarray, *, args, vocab_size: int, pg
) -> dict[str, np.ndarray]:
    """The teacher's top-k, tail and CE of ``samples`` (all rows on the last stage; empty elsewhere)."""
    import torch.distributed as dist

    from megatron_ddk.distill.teacher_cache import sample_fingerprint
    from megatron_ddk.platform.distributed import is_pp_last_stage

    rows = [dataset[int(i)] for i in samples]
    group = pg.tp if dist.get_world_size(pg.tp) > 1 else None
    extract = partial(
        extract_fields,
        top_k=args.top_k,
        temperature=args.kd_temperature,
        vocab_size=vocab_size,
        tp_group=group,
        tail_samples=args.tail_samples,
    )
    outputs = teacher_forward(
        teacher,
        micro_batches(rows, args.micro_batch_size),
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        pg=pg,
        on_logits=extract,
    )
    if not is_pp_last_stage(pg):
        return {}
    arrays = {key: torch.cat([o[key] for o in outputs]).numpy() for key in outputs[0]}
    arrays["log_probs"] = arrays["log_probs"].astype(np.float16)
    arrays["tail"] = arrays["tail"].astype(np.float16)
    arrays["sample_id"] = np.asarray(samples, dtype=np.int64)
    arrays["fingerprint"] = np.array(
        [sample_fingerprint(r["tokens"], r["labels"]) for r in rows], dtype=np.uint64
    )
    return arrays


def _from_rank_0(values: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        from megatron_ddk.platform.distributed import device

        values = values.to(device())
        dist.broadcast(values, src=0)
    return values.cpu()


def _any_rank(flag: bool) -> bool:
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        from megatron_ddk.platform.distributed import device

        value = value.to(device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _progress(total: int, *, enabled: bool, dp_size: int):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        desc=f"teacher top-k (DP group 0 of {dp_size})",
        file=sys.stderr,
        smoothing=0.1,
    )


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def distributed_print(message: str) -> None:
    from megatron_ddk.platform.distributed import is_rank_0

    if is_rank_0():
        print(message, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as err:
        if os.environ.get("MEGATRON_DDK_TRACEBACK"):
            raise
        rank = int(
            os.environ.get("RANK", "0")
        )  # every rank reports (torchrun stops the job at the first exit)
        prefix = "" if rank == 0 else f"[rank {rank}] "
        print(f"{prefix}cache_teacher_logits.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":  # dist_checkpointing's loader may spawn processes
    sys.exit(main())
