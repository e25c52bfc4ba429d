"""Where a run's teacher outputs come from when ``--teacher-cache`` is given: the cache, the online teacher as fallback.

``CachedTeacher`` is built from the run's config before any model exists and checks what can be
checked cheaply (the cache's identity against this run's tokenizer, datasets, seed, sequence
length, temperature and, with ``--teacher-load``, teacher checkpoint). Once the datasets exist,
``check_coverage`` refuses a run that could draw a sample the cache lacks (unless the online
teacher can fill in) and verifies the checksums of every shard the run can read, split over ranks
(``--teacher-cache-verify sizes-only`` skips that: the sizes are always checked when the cache opens).

During training, ``CachedTeacherBatches`` attaches each micro-batch's cached rows (``TEACHER_FIELDS``)
for the sparse KD loss (``training/step.py``); a micro-batch with a missing row gets none and the
online teacher runs for it instead (``DistillationModel.run_teacher``, toggled as the batch is
handed out). DDK's teacher validation CE is summed from the cached per-sample CE.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from megatron_ddk.distill.teacher_cache import (
    TeacherCache,
    checkpoint_identity,
    run_identity,
    sample_fingerprint,
)
from megatron_ddk.errors import CheckpointError, ConfigError

TEACHER_FIELDS = ("teacher_topk_ids", "teacher_topk_log_probs", "teacher_tail_log_mass", "teacher_ce_sum")
"""Batch keys of a cached micro-batch: [b, s, k] int32, [b, s, k] fp16, [b, s] fp16, [b] fp64."""


class CachedTeacher:
    def __init__(self, cfg, tokenizer, registry):
        self.cfg = cfg
        self.flag = f"--teacher-cache {cfg.distill.teacher_cache}"
        self.cache = TeacherCache(cfg.distill.teacher_cache)
        self.registry = registry
        self.fallback = cfg.distill.teacher_load is not None
        problems = []
        if self.cache.domain_names != registry.names:
            problems.append(
                f"the cache holds domains {self.cache.domain_names}, the run has {registry.names}"
            )
        if self.cache.layout.tail_samples and cfg.distill.kd_loss_type != "forward_kl":
            problems.append(
                f"--kd-loss-type {cfg.distill.kd_loss_type} needs the teacher's probability of every "
                f"token; this cache has {self.cache.layout.tail_samples} sampled tail tokens per position "
                "(--tail-samples), which serve forward_kl only: use --kd-loss-type forward_kl, or a "
                "cache built without --tail-samples"
            )
        if self.fallback and cfg.parallel.pipeline_model_parallel_size > 1:
            problems.append(
                "falling back to the online teacher (--teacher-load with --teacher-cache) needs "
                "--pipeline-model-parallel-size 1 (one p2p shape per schedule); fill the cache instead"
            )
        if problems:
            raise ConfigError(f"{self.flag}: {'; '.join(problems)}")
        expected = run_identity(
            tokenizer=tokenizer,
            registry=registry,
            seed=cfg.training.seed,
            seq_length=cfg.data.seq_length,
            temperature=cfg.distill.kd_temperature,
        )
        if self.fallback:
            expected["teacher"] = checkpoint_identity(cfg.distill.teacher_load)
        self.cache.check_identity(expected)

    # ------------------------------------------------------------------------------ coverage
    def check_coverage(self, domains: Sequence, *, rank: int, world: int) -> None:
        """Refuse a run that could draw uncached samples (without fallback); verify the shards it can read."""
        from megatron_ddk.data.coverage import RunDraws, samples_a_run_can_draw

        cfg, cache = self.cfg, self.cache
        sizes = {"train": [len(d.train) for d in domains], "valid": [len(d.valid) for d in domains]}
        recorded = {split: [d[f"{split}_samples"] for d in cache.index["domains"]] for split in sizes}
        if recorded != sizes:
            raise CheckpointError(
                f"{self.flag}: built for {recorded['train']} training / {recorded['valid']} "
                f"validation samples per domain, this run has {sizes['train']} / {sizes['valid']}; "
                "the datasets differ: rebuild the cache"
            )
        run = RunDraws(
            train_iters=cfg.training.train_iters,
            global_batch_size=cfg.training.global_batch_size,
            interval=cfg.ddk.interval,
            seed=cfg.training.seed,
            mode=cfg.distill.mode,
            mixing=cfg.ddk.mixing,
            alpha=cfg.ddk.alpha,
        )
        train, exact = samples_a_run_can_draw(sizes["train"], self.registry.initial_weights, run)
        valid = [np.arange(min(cfg.ddk.val_samples, n)) for n in sizes["valid"]]
        shards, gaps = set(), []
        for d, name in enumerate(cache.domain_names):
            missing_train = cache.missing("train", d, train[d]).size
            missing_valid = cache.missing("valid", d, valid[d]).size
            if missing_train or missing_valid:
                gaps.append(
                    f"{name}: {missing_train} of {len(train[d])} training, {missing_valid} of "
                    f"{len(valid[d])} validation samples"
                )
            shards |= cache.shards_holding("train", d, train[d]) | cache.shards_holding("valid", d, valid[d])
        if gaps and not self.fallback:
            raise CheckpointError(
                f"{self.flag} lacks samples this run can draw ({'exactly' if exact else 'at most, DDK bound'}): "
                f"{'; '.join(gaps)}. Fill the gap with: {self.fill_command()} (or add --teacher-load to fall "
                "back to the online teacher)"
            )
        if cfg.distill.teacher_cache_verify == "before-training":
            self._verify(sorted(shards), rank=rank, world=world)

    def _verify(self, shards: list[int], *, rank: int, world: int) -> None:
        """Each rank checks a slice of the shards; every rank learns the first bad one and raises the same error."""
        import torch.distributed as dist

        bad = torch.tensor([len(self.cache.shards)], dtype=torch.long)
        for number in shards[rank::world]:
            try:
                self.cache.verify([number])
            except CheckpointError:
                bad[0] = min(int(bad[0]), number)
                break
        if dist.is_initialized() and world > 1:
            from megatron_ddk.platform.distributed import device

            bad = bad.to(device())
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        if int(bad[0]) < len(self.cache.shards):
            self.cache.verify([int(bad[0])])  # raises the one-line error naming the shard
            raise CheckpointError(
                f"{self.flag}: shard {self.cache.shards[int(bad[0])]['file']} fails its checksum"
            )

    def fill_command(self) -> str:
        """The tool invocation that caches everything this run can draw (teacher path as the cache recorded it)."""
        cfg, built = self.cfg, self.cache.index.get("built_with", {})
        data = ["--domains", cfg.data.domains] if cfg.data.domains else ["--data-path", *cfg.data.data_path]
        args = [
            "tools/cache_teacher_logits.py",
            "--output",
            cfg.distill.teacher_cache,
            "--teacher-load",
            cfg.distill.teacher_load or built.get("teacher_load", "TEACHER"),
            "--tokenizer-type",
            cfg.data.tokenizer_type,
            "--tokenizer-model",
            cfg.data.tokenizer_model,
            *data,
            "--seq-length",
            cfg.data.seq_length,
            "--seed",
            cfg.training.seed,
            "--top-k",
            self.cache.layout.top_k,
            "--tail-samples",
            self.cache.layout.tail_samples,
            "--kd-temperature",
            cfg.distill.kd_temperature,
            "--train-iters",
            cfg.training.train_iters,
            "--global-batch-size",
            cfg.training.global_batch_size,
            "--ddk-interval",
            cfg.ddk.interval,
            "--ddk-mode",
            cfg.distill.mode,
            "--ddk-mixing",
            cfg.ddk.mixing,
            "--ddk-alpha",
            cfg.ddk.alpha,
            "--val-samples",
            cfg.ddk.val_samples,
        ]
        if cfg.data.data_cache_path:
            args += ["--data-cache-path", cfg.data.data_cache_path]
        return "torchrun --nproc-per-node N " + " ".join(shlex.quote(str(a)) for a in args)

    # ------------------------------------------------------------------------------- serving
    def rows(self, batch: dict[str, torch.Tensor], split: str = "train") -> dict[str, torch.Tensor] | None:
        """The cached fields ``TEACHER_FIELDS`` of a micro-batch of ``split``, or None if any row is not cached.

        A validation batch's padding rows (``sample_id`` -1) repeat sample 0 (``data.loader``) and get its row.
        """
        found = []
        for d, sample, tokens, labels in zip(
            batch["domain_id"].tolist(), batch["sample_id"].tolist(), batch["tokens"], batch["labels"]
        ):
            sample = max(sample, 0)
            fields = self.cache.row(split, d, sample)
            if fields is None:
                return None
            if int(fields["fingerprint"]) != sample_fingerprint(tokens.numpy(), labels.numpy()):
                raise CheckpointError(
                    f"{self.flag}: the cached row of {split} sample {sample} of domain "
                    f"{self.cache.domain_names[d]!r} was computed on other tokens; the cache "
                    "does not belong to these datasets: rebuild it"
                )
            found.append(fields)
        return stack_rows(found)

    def validation_rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The cached fields of a validation micro-batch (``--ddk-signal kd-gap``); every row must be cached."""
        rows = self.rows(batch, split="valid")
        if rows is None:
            raise CheckpointError(
                f"{self.flag} lacks validation samples this run evaluates; fill it with: {self.fill_command()}"
            )
        return rows

    def holds_validation(self, valid_sizes: Sequence[int], num_samples: int) -> bool:
        """Whether every domain's first ``num_samples`` validation samples are cached (index lookups only)."""
        return not any(
            self.cache.missing("valid", d, np.arange(min(num_samples, size))).size
            for d, size in enumerate(valid_sizes)
        )

    def validation_ce(self, valid_sizes: Sequence[int], num_samples: int) -> np.ndarray | None:
        """Mean teacher CE per domain over the first ``num_samples`` validation samples; None if any is missing."""
        if not self.holds_validation(valid_sizes, num_samples):
            return None
        return np.asarray(
            [total / tokens for total, tokens in validation_ce_sums(self.cache, valid_sizes, num_samples)],
            dtype=np.float64,
        )


def validation_ce_sums(
    cache: TeacherCache, valid_sizes: Sequence[int], num_samples: int
) -> list[tuple[float, float]]:
    """Per domain, the cached teacher's (CE sum, token count) over its first ``num_samples`` validation samples
    (every one must be cached: ``TeacherCache.teacher_ce`` raises otherwise)."""
    return [
        cache.teacher_ce("valid", d, np.arange(min(num_samples, size))) for d, size in enumerate(valid_sizes)
    ]


def stack_rows(found: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """A micro-batch's ``TEACHER_FIELDS`` from its cached rows (``TeacherCache.row``: memory-mapped views)."""
    return {
        "teacher_topk_ids": torch.from_numpy(np.stack([f["ids"] for f in found]).astype(np.int32)),
        "teacher_topk_log_probs": torch.from_numpy(np.stack([f["log_probs"] for f in found])),
        "teacher_tail_log_mass": torch.from_numpy(np.stack([f["tail"] for f in found])),
        "teacher_ce_sum": torch.tensor([float(f["ce_sum"]) for f in found], dtype=torch.float64),
    }


class CachedTeacherBatches:
    """Training micro-batches with their cached teacher rows; the online teacher runs only for uncached ones."""

    def __init__(self, batches: Iterator, teacher: CachedTeacher, model):
        self.batches = batches
        self.teacher = teacher
        self.model = model
        """The ``DistillationModel``: its ``run_teacher`` follows the micro-batch about to run."""
        self.online_micro_batches = 0

    def __iter__(self) -> CachedTeacherBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self.batches)
        rows = self.teacher.rows(batch)
        if rows is None:
            if (
                self.model.teacher is None
            ):  # check_coverage makes this impossible; never train without the KD term
                raise CheckpointError(
                    f"{self.teacher.flag}: a drawn training sample is not cached and there is no "
                    "--teacher-load to fall back to"
                )
            self.online_micro_batches += 1
        else:
            batch.update(rows)
        self.model.run_teacher = rows is None and self.model.teacher is not None
        return batch
