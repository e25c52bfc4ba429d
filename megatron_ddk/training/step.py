"""The forward step and loss function handed to megatron-core's ``forward_backward_func``.

Contract (Megatron's): ``forward_step(data_iterator, model) -> (output, loss_func)`` and
``loss_func(output) -> (loss_sum, num_tokens, report)``. With ``calculate_per_token_loss`` the
schedule leaves ``loss_sum`` un-normalised and ``finalize_model_grads`` divides the gradients by
the global token count, so the loss is an exact per-token mean over the whole global batch, whatever
the micro-batching and DP layout.

Per token: ``loss = CE(student) + gamma * KD(teacher || student)`` (the paper's Eq. 3); masked
tokens (``loss_mask == 0``) count nowhere. Reports carry sums and token counts so that averages
over micro-batches and DP ranks are exact.

Process groups come in as ``pg`` (megatron-core's ``ProcessGroupCollection``): the pipeline group
decides which stage computes the loss, the tensor-parallel group is the one the KD loss reduces
over, and with context parallelism (``pg.cp``) each rank keeps its two load-balanced chunks of every
sequence (``context_parallel_chunks``): its sums and token counts cover only those positions, and the
reductions over ``pg.dp_cp`` (gradients, ``training.metrics``) add them up to whole sequences.
(megatron-core's ``vocab_parallel_cross_entropy`` takes no group argument: it uses the TP group of the
parallel state, which is ``pg.tp``.)

Shapes: ``[b, s]`` per-token values; logits ``[b, s, v]`` (megatron-core's GPTModel returns them
batch first), ``v`` = this TP rank's shard of the padded vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel

from megatron_ddk.distill.kd_loss import default_chunk_size, vocab_parallel_kd_loss
from megatron_ddk.distill.topk_kd_loss import vocab_parallel_topk_kd_loss
from megatron_ddk.platform import distributed

# Scalar report keys: each report value is a 2-vector [sum over tokens, number of tokens].
LM_LOSS = "lm loss"
KD_LOSS = "kd loss"
TEACHER_LM_LOSS = "teacher lm loss"
# Per-domain report: [ce sums (N) | token counts (N)] of the student, and of the teacher when present.
DOMAIN_LM_LOSS = "domain lm loss"
DOMAIN_TEACHER_LM_LOSS = "domain teacher lm loss"
# Per-domain KD divergence [sums (N) | token counts (N)]: DDK's kd-gap signal (LossSettings.measure_kd).
DOMAIN_KD_LOSS = "domain kd loss"


@dataclass(frozen=True, kw_only=True)
class LossSettings:
    num_domains: int
    vocab_size: int
    """The tokenizer's true vocabulary: KD puts no probability mass on padded embedding rows."""
    kd_weight: float = 0.0
    kd_loss_type: str = "forward_kl"
    kd_temperature: float = 1.0
    kd_jsd_beta: float = 0.5
    kd_chunk_size: int | None = None
    train_on_kd: bool = True
    """False for validation: report CE (and teacher CE) only."""
    measure_kd: bool = False
    """Validation for ``--ddk-signal kd-gap``: also report the KD divergence per domain (not trained on)."""
    cache_tail_samples: int = 0
    """The teacher cache's sampled tail columns (its layout's ``tail_samples``): the KD loss's estimator."""


def move_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    target = distributed.device()
    return {key: value.to(target, non_blocking=True) for key, value in batch.items()}


def context_parallel_chunks(batch: dict[str, torch.Tensor], cp_group) -> dict[str, torch.Tensor]:
    """This CP rank's share of ``batch``: chunks r and 2*CP-1-r of every per-position field.

    Per-position fields are ``[b, s, ...]`` (tokens, labels, loss_mask, position_ids, the teacher
    cache's rows); per-sample fields are ``[b]`` and stay whole, except ``teacher_ce_sum`` (the cached
    teacher CE summed over the whole sample), which only CP rank 0 keeps so the CP sum counts it once.
    """
    from megatron.core.utils import get_batch_on_this_cp_rank

    cp_size = dist.get_world_size(cp_group) if cp_group is not None else 1
    if cp_size == 1:
        return batch
    per_position = {key: value for key, value in batch.items() if value.dim() >= 2}
    result = dict(batch)
    result.update(get_batch_on_this_cp_rank(per_position, cp_group=cp_group))
    if "teacher_ce_sum" in batch and dist.get_rank(cp_group) != 0:
        result["teacher_ce_sum"] = torch.zeros_like(batch["teacher_ce_sum"])
    return result


def forward_step(data_iterator, model, *, settings: LossSettings, pg):
    """Run one micro-batch through the (student, teacher) stage; the last stage gets a loss function."""
    batch = context_parallel_chunks(move_batch(next(data_iterator)), pg.cp)
    output = model(batch["tokens"], batch["position_ids"], None)
    if not distributed.is_pp_last_stage(pg):
        return output, None
    student_logits, teacher_logits = output
    return student_logits, partial(loss_func, batch, teacher_logits, settings=settings, tp_group=pg.tp)


def _per_domain(
    values: torch.Tensor, mask: torch.Tensor, domain_id: torch.Tensor, num_domains: int
) -> torch.Tensor:
    """[sums per domain | token counts per domain] from per-token ``values`` [b, s]."""
    sums = torch.zeros(num_domains, dtype=torch.float32, device=values.device)
    counts = torch.zeros(num_domains, dtype=torch.float32, device=values.device)
    sums.index_add_(0, domain_id, (values * mask).sum(dim=1))
    counts.index_add_(0, domain_id, mask.sum(dim=1))
    return torch.cat([sums, counts])


def loss_func(
    batch: dict[str, torch.Tensor],
    teacher_logits: torch.Tensor | None,
    student_logits: torch.Tensor,
    *,
    settings: LossSettings,
    tp_group,
):
    """CE + gamma * KD summed over unmasked tokens; logits are ``[b, s, v]`` vocab shards."""
    labels, mask = batch["labels"], batch["loss_mask"].float()
    num_tokens = mask.sum()
    kd = None
    cached = "teacher_topk_ids" in batch  # rows of a teacher cache (distill/teacher_source.py)
    want_kd = (settings.train_on_kd and settings.kd_weight > 0) or settings.measure_kd
    if cached and want_kd:
        kd = vocab_parallel_topk_kd_loss(
            student_logits,
            batch["teacher_topk_ids"],
            batch["teacher_topk_log_probs"],
            batch["teacher_tail_log_mass"],
            kind=settings.kd_loss_type,
            temperature=settings.kd_temperature,
            jsd_beta=settings.kd_jsd_beta,
            chunk_size=settings.kd_chunk_size or default_chunk_size(student_logits.shape[-1]),
            vocab_size=settings.vocab_size,
            tp_group=tp_group,
            tail_samples=settings.cache_tail_samples,
        )  # [b, s]
    elif teacher_logits is not None and want_kd:
        # before the cross-entropies: megatron-core's vocab_parallel_cross_entropy works in place on
        # fp32 logits (``.float()`` of an fp32 tensor is the tensor itself)
        kd = vocab_parallel_kd_loss(
            student_logits,
            teacher_logits,
            kind=settings.kd_loss_type,
            temperature=settings.kd_temperature,
            jsd_beta=settings.kd_jsd_beta,
            chunk_size=settings.kd_chunk_size or default_chunk_size(student_logits.shape[-1]),
            vocab_size=settings.vocab_size,
            tp_group=tp_group,
        )  # [b, s]
    ce = tensor_parallel.vocab_parallel_cross_entropy(student_logits.float(), labels)  # [b, s]
    loss = (ce * mask).sum()
    report = {
        LM_LOSS: torch.stack([loss.detach(), num_tokens]),
        DOMAIN_LM_LOSS: _per_domain(ce.detach(), mask, batch["domain_id"], settings.num_domains),
    }
    if cached:  # the teacher's CE per sample, summed over the same loss-mask tokens when it was cached
        report[TEACHER_LM_LOSS] = torch.stack([batch["teacher_ce_sum"].sum().float(), num_tokens])
    elif teacher_logits is not None:
        with torch.no_grad():
            teacher_ce = tensor_parallel.vocab_parallel_cross_entropy(teacher_logits.float(), labels)
        report[TEACHER_LM_LOSS] = torch.stack([(teacher_ce * mask).sum(), num_tokens])
        report[DOMAIN_TEACHER_LM_LOSS] = _per_domain(
            teacher_ce, mask, batch["domain_id"], settings.num_domains
        )
    if kd is not None and settings.measure_kd:
        report[DOMAIN_KD_LOSS] = _per_domain(kd.detach(), mask, batch["domain_id"], settings.num_domains)
    if kd is not None and settings.train_on_kd:
        kd_sum = (kd * mask).sum()
        loss = loss + settings.kd_weight * kd_sum
        report[KD_LOSS] = torch.stack([kd_sum.detach(), num_tokens])
    return loss, num_tokens.to(torch.int), report
