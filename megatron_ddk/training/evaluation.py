"""Per-domain validation cross-entropy of the student (and, once, of the teacher); the KD gap on request.

Runs megatron-core's forward-only schedule over each domain's held-out samples, split across DP
ranks without overlap, through every TP/PP stage; the per-domain token sums are reduced so that
every rank ends with the same numbers (``training.metrics.reduce_reports``). The result is plain
arrays: DDK's controller (``megatron_ddk.ddk``) consumes them without knowing about models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ddk.data.loader import evaluation_batches
from megatron_ddk.distill.model import DistillationModel
from megatron_ddk.errors import DataError
from megatron_ddk.platform.distributed import is_pp_last_stage
from megatron_ddk.training.metrics import reduce_reports
from megatron_ddk.training.step import (
    DOMAIN_KD_LOSS,
    DOMAIN_LM_LOSS,
    DOMAIN_TEACHER_LM_LOSS,
    LossSettings,
    forward_step,
)


@dataclass(frozen=True)
class DomainEvaluation:
    """Mean token CE per domain; ``ce_teacher`` is None for student-only passes, ``kd_gap`` (the mean
    per-token KD divergence, teacher || student) unless it was asked for."""

    ce_student: np.ndarray
    ce_teacher: np.ndarray | None
    tokens: np.ndarray
    kd_gap: np.ndarray | None = None

    @property
    def ppl_student(self) -> np.ndarray:
        return np.exp(self.ce_student)

    @property
    def ppl_teacher(self) -> np.ndarray | None:
        return None if self.ce_teacher is None else np.exp(self.ce_teacher)


def evaluate_domains(
    model: torch.nn.Module,
    unwrapped: DistillationModel,
    valid_sets: Sequence,
    *,
    num_samples: int,
    micro_batch_size: int,
    seq_length: int,
    settings: LossSettings,
    with_teacher: bool,
    shape_adjuster: Callable | None,
    pg,
    measure_kd: bool = False,
    cached_rows: Callable[[dict], dict] | None = None,
) -> DomainEvaluation:
    """Mean CE of each domain's first ``num_samples`` validation samples (all ranks get the result).

    ``pg``: the ProcessGroupCollection; samples are split over ``pg.dp`` (the CP
    ranks of a replica share them and split each sequence), stages run over ``pg.pp``.
    ``measure_kd``: also the KD divergence per domain, from the online teacher (``with_teacher``) or
    from ``cached_rows(batch)``, the teacher cache's fields of a validation micro-batch.
    """
    dp_rank, dp_size = dist.get_rank(pg.dp), dist.get_world_size(pg.dp)
    batches = []
    for domain_id, dataset in enumerate(valid_sets):
        for batch in evaluation_batches(
            dataset,
            num_samples=num_samples,
            micro_batch_size=micro_batch_size,
            dp_rank=dp_rank,
            dp_size=dp_size,
        ):
            batch = dict(batch)
            batch["domain_id"] = torch.full((batch["tokens"].shape[0],), domain_id, dtype=torch.long)
            if cached_rows is not None:
                batch.update(cached_rows(batch))
            batches.append(batch)
    num_domains = len(valid_sets)
    eval_settings = replace(settings, train_on_kd=False, measure_kd=measure_kd)
    was_training = model.training
    unwrapped.run_teacher = with_teacher
    model.eval()
    try:
        with torch.no_grad():
            reports = get_forward_backward_func()(
                forward_step_func=partial(forward_step, settings=eval_settings, pg=pg),
                data_iterator=iter(batches),
                model=[model],
                num_microbatches=len(batches),
                seq_length=seq_length,
                micro_batch_size=micro_batch_size,
                forward_only=True,
                adjust_tensor_shapes_fn=shape_adjuster if (with_teacher and shape_adjuster) else None,
            )
    finally:
        unwrapped.run_teacher = unwrapped.teacher is not None
        model.train(was_training)
    totals = reduce_reports(
        reports if is_pp_last_stage(pg) else [],
        {
            DOMAIN_LM_LOSS: 2 * num_domains,
            DOMAIN_TEACHER_LM_LOSS: 2 * num_domains,
            DOMAIN_KD_LOSS: 2 * num_domains,
        },
        pg,
    )
    student = totals[DOMAIN_LM_LOSS].numpy()
    tokens = student[num_domains:]
    if np.any(tokens == 0):
        empty = [i for i in range(num_domains) if tokens[i] == 0]
        raise DataError(f"domains {empty} have no validation tokens; check their validation sets")
    ce_student = student[:num_domains] / tokens
    ce_teacher = None
    if with_teacher:
        teacher = totals[DOMAIN_TEACHER_LM_LOSS].numpy()
        ce_teacher = teacher[:num_domains] / teacher[num_domains:]
    kd_gap = None
    if measure_kd:
        kd = totals[DOMAIN_KD_LOSS].numpy()
        kd_gap = kd[:num_domains] / kd[num_domains:]
    return DomainEvaluation(ce_student=ce_student, ce_teacher=ce_teacher, tokens=tokens, kd_gap=kd_gap)
