"""The training loop: built in dependency order in ``__init__``, run by ``train``.

One ``Trainer`` serves the three modes of the paper's comparison:

- ``cpt``: the student alone on a static mixture (continued pre-training);
- ``kd``: plus a frozen teacher, loss CE + gamma * KD, static mixture;
- ``ddk``: plus per-domain validation every K iterations driving the mixture (Eq. 1-2).

All numerics go through megatron-core: ``get_forward_backward_func`` (gradient accumulation and
pipeline schedules), its DDP wrapper, ``get_megatron_optimizer``, ``OptimizerParamScheduler`` and
``dist_checkpointing``. Cheap checks (data registry, teacher checkpoint, vocabulary agreement,
resume compatibility) run before any model is built.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_ddk.checkpointing import (
    BackgroundSaves,
    CheckpointMetadata,
    TrainingParts,
    load_model_state,
    load_training_checkpoint,
    read_metadata,
    read_tracker,
    resolve_checkpoint,
    save_training_checkpoint,
)
from megatron_ddk.config import RunConfig
from megatron_ddk.data.datasets import build_domain_datasets
from megatron_ddk.data.domains import load_domain_registry, registry_from_data_path, validate_registry
from megatron_ddk.data.loader import MixedDomainBatches
from megatron_ddk.data.mixing import DomainMixingSchedule
from megatron_ddk.data.tokenizer import padded_vocab_size, tokenizer_identity
from megatron_ddk.ddk.controller import DDKController
from megatron_ddk.distill.model import DistillationModel, pipeline_shape_adjuster
from megatron_ddk.distill.teacher_source import CachedTeacher, CachedTeacherBatches
from megatron_ddk.errors import CheckpointError
from megatron_ddk.layout_checks import check_layout
from megatron_ddk.models.gpt import (
    build_gpt_model,
    check_context_parallel_supported,
    check_fp8_supported,
    check_sequence_parallel_supported,
    expert_parallel_problem,
)
from megatron_ddk.platform import distributed
from megatron_ddk.training import nonfinite, report
from megatron_ddk.training.evaluation import DomainEvaluation, evaluate_domains
from megatron_ddk.training.metrics import mean, reduce_reports
from megatron_ddk.training.step import (
    DOMAIN_LM_LOSS,
    KD_LOSS,
    LM_LOSS,
    TEACHER_LM_LOSS,
    LossSettings,
    forward_step,
)


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """What one optimizer step reports: the reduced loss reports (same on every rank) and the grad norm."""

    totals: dict[str, torch.Tensor]
    grad_norm: float | None


class Trainer:
    """Builds every component in dependency order in ``__init__``; ``train`` runs the loop.

    A variant overrides one method: ``train_step`` (one optimizer step), ``update_mixture``
    (evaluate -> controller -> sampler) or ``evaluate``.
    """

    def __init__(self, cfg: RunConfig, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.layout = distributed.ParallelLayout(
            world_size=distributed.world_size_from_env(),
            tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=cfg.parallel.pipeline_model_parallel_size,
            context_parallel_size=cfg.parallel.context_parallel_size,
            expert_model_parallel_size=cfg.parallel.expert_model_parallel_size,
        )
        # ---- cheap checks first: nothing expensive has happened if any of these fails
        teacher = (
            read_metadata(cfg.distill.teacher_load, flag="--teacher-load")
            if cfg.distill.uses_teacher and cfg.distill.teacher_load
            else None
        )
        check_layout(
            cfg,
            teacher.model if teacher else None,
            teacher_source=f"--teacher-load {cfg.distill.teacher_load}",
        )
        self.registry = (
            load_domain_registry(cfg.data.domains)
            if cfg.data.domains
            else registry_from_data_path(list(cfg.data.data_path))
        )
        # every rank checks the files; global rank 0 alone reads all tokens for the vocabulary check
        # (if it fails, torchrun stops the other ranks)
        validate_registry(
            self.registry, vocab_size=tokenizer.vocab_size, scan_token_ids=distributed.rank_from_env() == 0
        )
        check_fp8_supported(cfg.precision)
        check_sequence_parallel_supported(cfg.parallel)
        check_context_parallel_supported(cfg.model, cfg.parallel, role="student")
        if teacher is not None:
            check_context_parallel_supported(teacher.model, cfg.parallel, role="teacher")
        self.teacher_metadata = (
            self._check_teacher() if cfg.distill.uses_teacher and cfg.distill.teacher_load else None
        )
        # --teacher-cache: identity checked now, coverage and checksums once the datasets exist
        self.cached_teacher = (
            CachedTeacher(cfg, tokenizer, self.registry) if cfg.distill.teacher_cache else None
        )
        self.resume_dir = self._check_resume()

        # ---- the process groups, built once; everything below receives them as ``pg``
        self.pg = distributed.initialize(self.layout)
        distributed.set_seed(cfg.training.seed, self.pg)
        self.writer = self._tensorboard()
        # --async-save: checkpoints written in the background, published at the next finished poll
        self.background_saves = BackgroundSaves(report.print_rank_0) if cfg.checkpoint.async_save else None
        self._signalled = False
        self._install_signal_handler()
        self.student, self.unwrapped, self.model, self.shape_adjuster = self._build_model()
        self.loss_settings = self._loss_settings()
        self.optimizer, self.scheduler = self._build_optimizer()
        self.domains = self._build_datasets()
        if self.cached_teacher is not None:
            self.cached_teacher.check_coverage(
                self.domains, rank=dist.get_rank(), world=dist.get_world_size()
            )
        self.controller = self._build_controller()
        self.schedule = DomainMixingSchedule(
            [len(d.train) for d in self.domains],
            window_size=self.controller.interval * cfg.training.global_batch_size,
            seed=cfg.training.seed,
            initial_weights=self.controller.initial_weights(),
        )
        self.iteration = 0
        if self.resume_dir is not None:
            self.iteration = self._load(self.resume_dir)
        self.batches = MixedDomainBatches(
            [d.train for d in self.domains],
            self.schedule,
            global_batch_size=cfg.training.global_batch_size,
            micro_batch_size=cfg.training.micro_batch_size,
            dp_rank=dist.get_rank(self.pg.dp),
            dp_size=dist.get_world_size(self.pg.dp),
            start_iteration=self.iteration,
        )
        if self.cached_teacher is not None:
            self.batches = CachedTeacherBatches(self.batches, self.cached_teacher, self.unwrapped)

    # ================================================================================ checks
    def _check_teacher(self) -> CheckpointMetadata:
        cfg = self.cfg
        meta = read_metadata(cfg.distill.teacher_load, flag="--teacher-load")
        problems = []  # (its layout against TP/PP: layout_checks)
        pp = cfg.parallel.pipeline_model_parallel_size
        student_identity = tokenizer_identity(self.tokenizer)
        teacher_identity = meta.tokenizer or {}
        if (
            teacher_identity.get("sha256")
            and student_identity.get("sha256")
            and teacher_identity["sha256"] != student_identity["sha256"]
        ):
            problems.append(
                f"--teacher-load {cfg.distill.teacher_load} was trained with a different tokenizer "
                f"({teacher_identity.get('type')}, sha256 {teacher_identity['sha256'][:12]}) than "
                f"--tokenizer-model {cfg.data.tokenizer_model} (sha256 {student_identity['sha256'][:12]}); "
                "teacher and student must share a vocabulary"
            )
        if teacher_identity.get("vocab_size") not in (None, self.tokenizer.vocab_size):
            problems.append(
                f"teacher tokenizer has {teacher_identity['vocab_size']} tokens but --tokenizer-model has "
                f"{self.tokenizer.vocab_size}; teacher and student must share a vocabulary"
            )
        tp = cfg.parallel.tensor_model_parallel_size
        t_rows = padded_vocab_size(meta.model.vocab_size, tp, meta.model.make_vocab_size_divisible_by)
        s_rows = padded_vocab_size(cfg.model.vocab_size, tp, cfg.model.make_vocab_size_divisible_by)
        if t_rows != s_rows:
            problems.append(
                f"teacher logits have {t_rows} (padded) vocabulary columns at TP={tp} but the student's have "
                f"{s_rows}; the student's vocabulary ({cfg.model.vocab_size}) must pad like the teacher's "
                f"({meta.model.vocab_size}): adjust --make-vocab-size-divisible-by"
            )
        if ep_problem := expert_parallel_problem(meta.model, cfg.parallel, role="teacher"):
            problems.append(ep_problem)
        if pp > 1 and cfg.teacher_precision.bf16 != cfg.precision.bf16:
            problems.append(
                "--teacher-bf16 must match --bf16 with pipeline parallelism (one p2p dtype for both models)"
            )
        if problems:
            raise CheckpointError("; ".join(problems))
        return meta

    def _check_resume(self) -> Path | None:
        """The checkpoint to resume from (None: fresh start), checked against this run's model."""
        load, step = self.cfg.checkpoint.load, self.cfg.checkpoint.ckpt_step
        if load is None or (
            not self.cfg.checkpoint.finetune
            and step is None
            and read_tracker(load) is None
            and not (Path(load) / "ddk_checkpoint.json").exists()
        ):
            if load is not None and not Path(load).exists() and not self.cfg.checkpoint.save == load:
                raise CheckpointError(f"--load {load}: no such directory")
            return None  # Megatron's behaviour: --load of an empty --save dir starts fresh
        resolved = resolve_checkpoint(load, flag="--load", step=step)
        meta = read_metadata(resolved, flag="--load")
        mine, theirs = _architecture(self.cfg.model), _architecture(meta.model)
        differ = [f"{k}: checkpoint {theirs[k]!r} vs flags {mine[k]!r}" for k in mine if mine[k] != theirs[k]]
        if differ:
            raise CheckpointError(
                f"--load {load} holds a different model ({'; '.join(differ)}); "
                "fix the model flags to match the checkpoint"
            )
        return resolved

    # ============================================================================== building
    def _build_model(self):
        """(student stage, DistillationModel, its DDP wrapper, the PP shape adjuster or None)."""
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

        cfg, pg = self.cfg, self.pg
        pre, post = distributed.is_pp_first_stage(pg), distributed.is_pp_last_stage(pg)
        tp = self.layout.tensor_model_parallel_size
        student = (
            build_gpt_model(  # the teacher (forward-only, no_grad) never recomputes: no recompute= below
                cfg.model,
                cfg.parallel,
                cfg.precision,
                pg=pg,
                pre_process=pre,
                post_process=post,
                padded_vocab_size=padded_vocab_size(
                    cfg.model.vocab_size, tp, cfg.model.make_vocab_size_divisible_by
                ),
                recompute=cfg.recompute,
            )
        )
        teacher = None
        if self.teacher_metadata is not None:
            t_model = self.teacher_metadata.model
            teacher = build_gpt_model(
                t_model,
                cfg.parallel,
                cfg.teacher_precision,
                pg=pg,
                pre_process=pre,
                post_process=post,
                padded_vocab_size=padded_vocab_size(
                    t_model.vocab_size, tp, t_model.make_vocab_size_divisible_by
                ),
                use_fp8=cfg.distill.teacher_fp8,
                initialize_weights=False,
            )
            load_model_state(cfg.distill.teacher_load, teacher, flag="--teacher-load")
        unwrapped = DistillationModel(student, teacher, pre_process=pre, post_process=post)
        shape_adjuster = (
            pipeline_shape_adjuster(self.teacher_metadata.model.hidden_size)
            if teacher is not None and self.layout.pp_enabled
            else None
        )
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            overlap_param_gather=cfg.parallel.overlap_param_gather,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            check_for_nan_in_grad=False,  # ours (training/nonfinite.py) works on CPU and names the quantity
        )
        model = DistributedDataParallel(
            config=student.config, ddp_config=ddp_config, module=unwrapped, pg_collection=pg
        )
        config = student.config
        config.finalize_model_grads_func = partial(finalize_model_grads, pg_collection=pg)
        config.no_sync_func = model.no_sync
        if cfg.parallel.overlap_grad_reduce:
            config.grad_sync_func = model.start_grad_sync
        if cfg.parallel.overlap_param_gather:
            config.param_sync_func = model.start_param_sync
        return student, unwrapped, model, shape_adjuster

    def _loss_settings(self) -> LossSettings:
        d = self.cfg.distill
        return LossSettings(
            num_domains=len(self.registry.domains),
            vocab_size=self.tokenizer.vocab_size,
            kd_weight=d.kd_weight if self.unwrapped.teacher is not None or d.teacher_cache else 0.0,
            kd_loss_type=d.kd_loss_type,
            kd_temperature=d.kd_temperature,
            kd_jsd_beta=d.kd_jsd_beta,
            kd_chunk_size=d.kd_chunk_size,
            cache_tail_samples=self.cached_teacher.cache.layout.tail_samples if self.cached_teacher else 0,
        )

    def _build_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        t, cfg = self.cfg.training, self.cfg
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.min_lr,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            adam_eps=t.adam_eps,
            clip_grad=t.clip_grad,
            bf16=cfg.precision.bf16,
            params_dtype=torch.bfloat16 if cfg.precision.bf16 else torch.float32,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            overlap_param_gather=cfg.parallel.overlap_param_gather,
        )
        # no pg_collection here: megatron-core then refuses the gloo groups the distributed optimizer
        # needs to save and load its state; it takes the same groups from the parallel state
        optimizer = get_megatron_optimizer(opt_config, [self.model])
        self.student.config.grad_scale_func = optimizer.scale_loss
        scheduler = OptimizerParamScheduler(
            optimizer,
            init_lr=0.0 if t.lr_warmup_iters > 0 else t.lr,
            max_lr=t.lr,
            min_lr=t.min_lr,
            lr_warmup_steps=t.lr_warmup_iters,
            lr_decay_steps=t.lr_decay_iters or t.train_iters,
            lr_decay_style=t.lr_decay_style,
            start_wd=t.weight_decay,
            end_wd=t.weight_decay,
            wd_incr_steps=t.train_iters,
            wd_incr_style="constant",
        )
        return optimizer, scheduler

    def _build_datasets(self):
        cfg = self.cfg
        cache = cfg.data.data_cache_path or (
            os.path.join(cfg.checkpoint.save, "data_cache")
            if cfg.checkpoint.save
            else os.path.join(os.path.expanduser("~"), ".cache", "megatron_ddk")
        )
        return build_domain_datasets(
            self.registry,
            tokenizer=self.tokenizer,
            seq_length=cfg.data.seq_length,
            seed=cfg.training.seed,
            cache_dir=cache,
        )

    def _build_controller(self) -> DDKController:
        cfg = self.cfg
        log_file = cfg.ddk.log_file or (
            os.path.join(cfg.checkpoint.save, "ddk_log.jsonl") if cfg.checkpoint.save else None
        )
        return DDKController(
            mixing=cfg.ddk.mixing,
            alpha=cfg.ddk.alpha,
            interval=cfg.ddk.interval,
            domain_names=self.registry.names,
            static_weights=self.registry.initial_weights,
            log_file=log_file if distributed.is_rank_0() else None,
            dynamic=cfg.distill.mode == "ddk",
            temperature=cfg.ddk.temperature,
            max_step=cfg.ddk.max_step,
            signal=cfg.ddk.signal,
        )

    def _tensorboard(self):
        if self.cfg.logging.tensorboard_dir is None or not distributed.is_rank_0():
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=self.cfg.logging.tensorboard_dir)

    # ============================================================================== evaluation
    def evaluate(self, *, with_teacher: bool, num_samples: int, measure_kd: bool = False) -> DomainEvaluation:
        """Per-domain validation; ``measure_kd`` (``--ddk-signal kd-gap``) adds the KD gap, from the
        teacher cache when it holds every validation sample evaluated, else from the online teacher."""
        cached_rows = None
        if measure_kd and self._validation_cached(num_samples):
            assert self.cached_teacher is not None
            cached_rows, with_teacher = self.cached_teacher.validation_rows, False
        elif measure_kd:
            with_teacher = True
        return evaluate_domains(
            self.model,
            self.unwrapped,
            [d.valid for d in self.domains],
            num_samples=num_samples,
            micro_batch_size=self.cfg.training.micro_batch_size,
            seq_length=self.cfg.data.seq_length,
            settings=self.loss_settings,
            with_teacher=with_teacher,
            shape_adjuster=self.shape_adjuster,
            pg=self.pg,
            measure_kd=measure_kd,
            cached_rows=cached_rows,
        )

    def _validation_cached(self, num_samples: int) -> bool:
        return self.cached_teacher is not None and self.cached_teacher.holds_validation(
            [len(d.valid) for d in self.domains], num_samples
        )

    def update_mixture(self) -> None:
        """Evaluate -> controller -> sampler: fix the weights of the window that starts now.

        At iteration 0 of a fresh run this evaluates the teacher too (once: it is frozen) and
        applies Eq. 1; after every K-th iteration it applies Eq. 2 to the window that just ended.
        """
        iteration, window = self.iteration, self.controller.window_of(self.iteration)
        first = iteration == 0
        kd_gap = self.controller.dynamic and self.cfg.ddk.signal == "kd-gap"
        evaluation = (
            self._first_evaluation(measure_kd=kd_gap)
            if first
            else self.evaluate(with_teacher=False, num_samples=self.cfg.ddk.val_samples, measure_kd=kd_gap)
        )
        if self.cfg.training.check_for_nan_in_loss_and_grad:
            nonfinite.raise_if(
                nonfinite.evaluation_problem(
                    evaluation,
                    iteration=iteration,
                    domain_names=self.registry.names,
                    teacher=self.cfg.distill.teacher_load or self.cfg.distill.teacher_cache,
                )
            )
        if first:
            weights = self.controller.start(
                evaluation.ce_student, evaluation.ce_teacher, kd_gap=evaluation.kd_gap
            )
        else:
            weights = self.controller.update(
                self.schedule.weights_for_window(window - 1),
                evaluation.ce_student,
                iteration=iteration,
                kd_gap=evaluation.kd_gap,
            )
        _check_same_on_all_ranks(weights, "DDK domain weights")
        self.schedule.set_window_weights(window, weights)
        record = self.controller.last_record
        report.print_rank_0(report.ddk_update_lines(record, "initial" if first else "update"))
        if self.writer is not None:
            report.write_ddk_scalars(self.writer, iteration, record)

    def _first_evaluation(self, *, measure_kd: bool = False) -> DomainEvaluation:
        """Student and teacher at iteration 0; the teacher's CE is read from the cache when it holds it."""
        num = self.cfg.ddk.val_samples
        if self.cached_teacher is not None:
            ce_teacher = self.cached_teacher.validation_ce([len(d.valid) for d in self.domains], num)
            if ce_teacher is not None:
                evaluation = self.evaluate(with_teacher=False, num_samples=num, measure_kd=measure_kd)
                return replace(evaluation, ce_teacher=ce_teacher)
        return self.evaluate(
            with_teacher=self.unwrapped.teacher is not None, num_samples=num, measure_kd=measure_kd
        )

    # ============================================================================== the loop
    def train_step(self) -> StepResult:
        """One optimizer step over one global batch; returns its reports reduced over all ranks."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        t = self.cfg.training
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=partial(forward_step, settings=self.loss_settings, pg=self.pg),
            data_iterator=self.batches,
            model=[self.model],
            num_microbatches=t.global_batch_size // (t.micro_batch_size * self.layout.data_parallel_size),
            seq_length=self.cfg.data.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=False,
            adjust_tensor_shapes_fn=self.shape_adjuster,
        )
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.iteration += 1
        totals = reduce_reports(
            reports if distributed.is_pp_last_stage(self.pg) else [], self._report_layout(), self.pg
        )
        return StepResult(totals=totals, grad_norm=None if grad_norm is None else float(grad_norm))

    def train(self) -> DomainEvaluation | None:
        """Run to ``--train-iters`` (or an exit condition); returns the final per-domain evaluation."""
        cfg, t = self.cfg, self.cfg.training
        if self.iteration == 0 and self.controller.ce_student_initial is None:
            self.controller.truncate_log(-1)  # a fresh run starts a fresh log
            self.update_mixture()
        window, last_saved = _LogWindow(self._report_layout()), None
        while self.iteration < t.train_iters:
            if self.background_saves is not None:  # publish a background save whose write finished
                self.background_saves.finish(blocking=False)
            step = self.train_step()
            if (
                t.check_for_nan_in_loss_and_grad
            ):  # identical totals on every rank: all stop here, before a save
                nonfinite.raise_if(
                    nonfinite.training_problem(
                        step.totals,
                        step.grad_norm,
                        iteration=self.iteration,
                        domain_names=self.registry.names,
                        teacher=cfg.distill.teacher_load if self.unwrapped.teacher is not None else None,
                    )
                )
            window.add(step.totals)
            if self.controller.is_update_iteration(self.iteration, t.train_iters):
                self.update_mixture()
            if self.iteration % cfg.logging.log_interval == 0 or self.iteration == t.train_iters:
                self._log_iteration(window, step.grad_norm)
                window = _LogWindow(self._report_layout())
            if cfg.logging.eval_interval and self.iteration % cfg.logging.eval_interval == 0:
                self._validate()
            signalled = self._signal_received()
            exiting = bool(t.exit_interval and self.iteration % t.exit_interval == 0) or signalled
            periodic = bool(
                cfg.checkpoint.save_interval and self.iteration % cfg.checkpoint.save_interval == 0
            )
            if cfg.checkpoint.save and (periodic or exiting):
                self.save()
                last_saved = self.iteration
            if exiting and self.iteration < t.train_iters:
                why = "SIGTERM received" if signalled else f"--exit-interval {t.exit_interval}"
                report.print_rank_0(f"exiting program at iteration {self.iteration} ({why})")
                self._publish_background_saves()
                return None
        if cfg.checkpoint.save and last_saved != self.iteration:
            self.save()
        self._publish_background_saves()
        final = self.evaluate(with_teacher=False, num_samples=cfg.ddk.val_samples)
        self.controller.finish(final.ce_student)
        last_weights = self.schedule.weights_for_window(self.controller.window_of(self.iteration - 1))
        report.print_rank_0(report.result_table(self.controller, final.ce_student, last_weights))
        return final

    def _install_signal_handler(self) -> None:
        import signal

        if self.cfg.training.exit_signal_handler:

            def handler(signum, frame):
                self._signalled = True

            signal.signal(signal.SIGTERM, handler)

    def _signal_received(self) -> bool:
        """True on every rank as soon as any rank got SIGTERM (they must stop at the same iteration)."""
        if not self.cfg.training.exit_signal_handler:
            return False
        flag = torch.tensor([1.0 if self._signalled else 0.0], device=distributed.device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ============================================================================== logging
    def _report_layout(self) -> dict[str, int]:
        """The training reports that are logged (the teacher's per-domain CE is for DDK's evaluation only)."""
        return {LM_LOSS: 2, KD_LOSS: 2, TEACHER_LM_LOSS: 2, DOMAIN_LM_LOSS: 2 * len(self.registry.domains)}

    def _log_iteration(self, window: _LogWindow, grad_norm: float | None) -> None:
        t = self.cfg.training
        has_teacher = self.unwrapped.teacher is not None or self.cached_teacher is not None
        lr = self.optimizer.param_groups[0]["lr"]
        elapsed, iters = time.time() - window.start, window.iterations
        tokens_per_second = iters * t.global_batch_size * self.cfg.data.seq_length / max(elapsed, 1e-9)
        losses = {"lm loss": mean(window.sums[LM_LOSS])}
        if has_teacher and self.loss_settings.kd_weight > 0:
            losses["kd loss"] = mean(window.sums[KD_LOSS])
        if has_teacher:
            losses["teacher lm loss"] = mean(window.sums[TEACHER_LM_LOSS])
        report.print_rank_0(
            report.iteration_line(
                iteration=self.iteration,
                train_iters=t.train_iters,
                global_batch_size=t.global_batch_size,
                elapsed_ms=1000 * elapsed / max(iters, 1),
                tokens_per_second=tokens_per_second,
                lr=lr,
                losses=losses,
                grad_norm=grad_norm,
            )
        )
        if self.writer is not None:
            n, domain = len(self.registry.domains), window.sums[DOMAIN_LM_LOSS]
            per_domain = {
                name: float(domain[i] / domain[n + i])
                for i, name in enumerate(self.registry.names)
                if domain[n + i] > 0
            }
            report.write_iteration_scalars(
                self.writer,
                self.iteration,
                lr=lr,
                losses=losses,
                grad_norm=grad_norm,
                tokens_per_second=tokens_per_second,
                domain_losses=per_domain,
            )

    def _validate(self) -> None:
        cfg = self.cfg
        samples = cfg.logging.eval_iters * cfg.training.micro_batch_size * self.layout.data_parallel_size
        evaluation = self.evaluate(with_teacher=False, num_samples=samples)
        line, total = report.validation_line(
            self.iteration, self.registry.names, evaluation.ce_student, evaluation.tokens
        )
        report.print_rank_0(line)
        if self.writer is not None:
            self.writer.add_scalar("validation/lm loss", total, self.iteration)
            for name, ce in zip(self.registry.names, evaluation.ce_student):
                self.writer.add_scalar(f"validation/{name}", float(ce), self.iteration)

    # ============================================================================== checkpoints
    def _parts(self) -> TrainingParts:
        return TrainingParts(
            student=self.student,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            schedule=self.schedule,
            controller=self.controller,
        )

    def save(self) -> None:
        cfg = self.cfg
        meta = CheckpointMetadata(
            iteration=self.iteration,
            model=cfg.model,
            tokenizer=tokenizer_identity(self.tokenizer),
            tensor_model_parallel_size=self.layout.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.layout.pipeline_model_parallel_size,
            data_parallel_size=self.layout.data_parallel_size,
            ddk_mode=cfg.distill.mode,
            has_optimizer=True,
        )
        start, timings = time.time(), {}
        path = save_training_checkpoint(
            cfg.checkpoint.save,
            self._parts(),
            meta,
            global_batch_size=cfg.training.global_batch_size,
            pg=self.pg,
            timings=timings,
            background=self.background_saves,
        )
        if self.background_saves is not None:  # the seconds training was blocked (staging, forking)
            report.print_rank_0(
                f"  scheduled an async checkpoint save at iteration {self.iteration:7d} to {path} "
                f"[ {time.time() - start:.2f}s ]"
            )
            return
        report.print_rank_0(
            f"  successfully saved checkpoint at iteration {self.iteration:7d} to {path} "
            f"[ {time.time() - start:.2f}s, manifest {timings.get('manifest', 0.0):.3f}s ]"
        )

    def _publish_background_saves(self) -> None:
        """Wait for the background save still being written and publish it (every rank)."""
        if self.background_saves is not None:
            self.background_saves.finish(blocking=True)

    def _load(self, path: Path) -> int:
        """Restore from ``path``; returns the iteration to continue from."""
        cfg = self.cfg
        meta = read_metadata(path)
        if cfg.checkpoint.finetune:
            load_model_state(path, self.student)
            self.optimizer.reload_model_params()
            report.print_rank_0(
                f"  loaded weights from {path} (--finetune: iteration, optimizer and data start fresh)"
            )
            return 0
        same_layout = (
            meta.tensor_model_parallel_size,
            meta.pipeline_model_parallel_size,
            meta.data_parallel_size,
        ) == (
            self.layout.tensor_model_parallel_size,
            self.layout.pipeline_model_parallel_size,
            self.layout.data_parallel_size,
        )
        iteration = load_training_checkpoint(
            path,
            self._parts(),
            load_optimizer=meta.has_optimizer and not cfg.checkpoint.no_load_optim,
            load_rng=same_layout and not cfg.checkpoint.no_load_rng,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            pg=self.pg,
        )
        self.controller.truncate_log(iteration)
        report.print_rank_0(
            f"  loaded checkpoint from {path} at iteration {iteration}"
            + (
                ""
                if same_layout
                else f" (resharded from TP{meta.tensor_model_parallel_size} "
                f"PP{meta.pipeline_model_parallel_size} DP{meta.data_parallel_size})"
            )
        )
        return iteration

    def close(self) -> None:
        # after an error too: a save in flight holds a state from before it (a non-finite loss or grad
        # stops the run before it is saved), so it is published like any other
        if self.background_saves is not None:
            self.background_saves.close()
        if self.writer is not None:
            self.writer.close()
        if dist.is_initialized():
            dist.barrier()


class _LogWindow:
    """Report sums over the iterations since the last log line, and when that window started."""

    def __init__(self, layout: dict[str, int]):
        self.sums = {key: torch.zeros(n, dtype=torch.float64) for key, n in layout.items()}
        self.iterations = 0
        self.start = time.time()

    def add(self, totals: dict[str, torch.Tensor]) -> None:
        for key in self.sums:
            self.sums[key] += totals[key]
        self.iterations += 1


def _check_same_on_all_ranks(values: np.ndarray, what: str) -> None:
    """Every rank must lay out the same sample stream: fail loudly if the weights ever diverge."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = torch.as_tensor(np.asarray(values, dtype=np.float64), device=distributed.device())
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    if any(not torch.equal(g, mine) for g in gathered):
        raise RuntimeError(f"{what} differ between ranks: {[g.tolist() for g in gathered]}")


def _architecture(model) -> dict:
    """What must agree between a checkpoint and the flags to load it: the shapes, normalised
    (``--kv-channels`` / ``--num-query-groups`` left to their defaults equal the explicit values),
    not the regularisation or the init."""
    values = model.to_dict()
    for key in ("attention_dropout", "hidden_dropout", "init_method_std", "kv_channels", "num_query_groups"):
        values.pop(key)
    values["head_dim"], values["query_groups"] = model.head_dim, model.query_groups
    return values
