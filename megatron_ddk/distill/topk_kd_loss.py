"""Sparse KD from a teacher's top-k: the divergence over k + 1 buckets, against vocab-parallel student logits.

A teacher cache (``teacher_cache.py``) keeps, per token, the teacher's k most likely token ids, their
log-probabilities at temperature T and the log of the remaining ("tail") mass. The student side is
the same as in ``kd_loss.py``: ``s = z_S / T`` over the FULL vocabulary split across the TP group
(all-reduce MAX of the row max, all-reduce SUM of the shifted exponentials). Both distributions are
then seen through the same k + 1 buckets: each top-k id is a bucket of its own, every other token
falls in the tail bucket::

    q_b = p_S[id_b] (b < k),   q_tail = sum_{j not in top-k} p_S[j]     (student)
    t_b = p_T[id_b],           t_tail = exp(tail log-mass)              (teacher, renormalised to 1)

    forward_kl  sum_b t_b (log t_b - log q_b)       dL/ds_j = p_S[j] - t_{b(j)} p_S[j] / q_{b(j)}
    reverse_kl  sum_b q_b (log q_b - log t_b)       dL/ds_j = p_S[j] (g_{b(j)} - L),  g = log q - log t
    jsd(beta)   beta KL(t || m) + (1 - beta) KL(q || m),  m = beta t + (1 - beta) q
                                                    dL/ds_j = (1 - beta) p_S[j] (g_{b(j)} - KL(q || m)),  g = log q - log m

(``dL/ds_j = p_S[j] (dL/dq_b - sum_c q_c dL/dq_c)`` for j in bucket b, from ``dq_b/ds_j = p_S[j] (1[j in b] - q_b)``.)
For a top-k column the forward-KL gradient is ``p_S[j] - t_j``, as in the full loss; for a tail column
it is the student's own probability scaled by ``1 - t_tail / q_tail``. With k equal to the vocabulary
the tail is empty and every formula is the full-vocabulary one. Empty buckets follow ``0 log 0 = 0``.

Under TP each top-k id lives on one rank: that rank gathers its shifted logit, the others contribute
0 to one all-reduce SUM that also carries the full and the tail normaliser (the tail sum zeroes the
owned top-k columns before summing, so a tiny tail loses no precision to cancellation). The loss is
then computed from [n, k + 1] global values, identical on every rank; each rank writes the gradient
of its own columns. Chunking, padding columns (``vocab_size``) and the backward are ``kd_loss.py``'s.

Shapes: student logits ``[..., v_local]`` (``[b, s, v]`` in the loss function); teacher ids and
log-probabilities ``[..., k]``; the tail log-mass ``[...]``; ``n`` = tokens in one chunk.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_ddk.distill.kd_loss import KD_KINDS, _ChunkedKDLoss, _reduce_tp, vocab_shard


def _check(
    kind: str,
    temperature: float,
    jsd_beta: float,
    student: torch.Tensor,
    ids: torch.Tensor,
    log_probs: torch.Tensor,
    tail: torch.Tensor,
    tail_samples: int = 0,
) -> None:
    problems = []
    if kind not in KD_KINDS:
        problems.append(f"--kd-loss-type {kind!r} is not one of {', '.join(KD_KINDS)}")
    if tail_samples and kind != "forward_kl":
        problems.append(
            f"--kd-loss-type {kind} needs the teacher's probability of every token the student puts mass "
            "on; a cache with sampled tail tokens (--tail-samples) serves forward_kl only"
        )
    if not 0 <= tail_samples < ids.shape[-1]:
        problems.append(
            f"tail_samples {tail_samples} must be in [0, {ids.shape[-1] - 1}] (the cached columns - 1)"
        )
    if not temperature > 0:
        problems.append(f"--kd-temperature must be > 0, got {temperature}")
    if not 0.0 <= jsd_beta <= 1.0:
        problems.append(f"--kd-jsd-beta must be in [0, 1], got {jsd_beta}")
    if (
        ids.shape != log_probs.shape
        or ids.shape[:-1] != student.shape[:-1]
        or tail.shape != student.shape[:-1]
    ):
        problems.append(
            f"teacher top-k ids {tuple(ids.shape)}, log-probs {tuple(log_probs.shape)} and tail "
            f"{tuple(tail.shape)} do not fit student logits {tuple(student.shape)}"
        )
    if ids.is_floating_point() or not student.is_floating_point():
        problems.append(f"expected integer ids and float logits, got {ids.dtype} and {student.dtype}")
    if problems:
        raise ValueError("; ".join(problems))


def _shifted_student(
    student: torch.Tensor, ids: torch.Tensor, temperature: float, group, first_column: int, work
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``s = (z - global row max) / T`` as one fp32 copy (into ``work`` when given), which cached
    columns this rank owns ``[n, k]`` and their local column (0 where not owned)."""
    n, v = student.shape
    if v == 0:  # this rank holds only padding columns
        row_max = torch.full((n, 1), float("-inf"), dtype=torch.float32, device=student.device)
    else:
        row_max = student.amax(dim=-1, keepdim=True).float()
    _reduce_tp(row_max, group, op=dist.ReduceOp.MAX)
    s = torch.sub(student, row_max) if work is None else torch.sub(student, row_max, out=work)
    if temperature != 1.0:
        s.div_(temperature)
    local = ids - first_column
    owned = (local >= 0) & (local < v)
    return s, owned, torch.where(owned, local, 0)


def _student_buckets(
    student: torch.Tensor,
    ids: torch.Tensor,
    temperature: float,
    group,
    first_column: int,
    work: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
    """The student's side of one [n, v_valid] chunk: its k + 1 bucket log-probabilities.

    Returns ``tail_exp`` [n, v_valid] fp32 (one fresh buffer: ``exp(s - max)`` with this rank's top-k
    columns zeroed, i.e. Z p_S on the tail columns), ``log_z`` [n] (global, relative to the max),
    ``log_q`` [n, k + 1] (global: top-k, then tail), ``owned`` [n, k] bool (the top-k entries whose
    column is on this rank) and ``where``, their (row, column) indices in ``owned``'s row-major order.
    ``work``: an fp32 [n, v_valid] buffer to use instead of a fresh one (the gradient's own storage).
    """
    n, v = student.shape
    s, owned, safe = _shifted_student(student, ids, temperature, group, first_column, work)
    sums = torch.zeros(
        n, ids.shape[1] + 2, dtype=torch.float32, device=student.device
    )  # [top-k s | total | tail]
    where = (owned.nonzero(as_tuple=True)[0], safe[owned])
    if v > 0:
        sums[:, :-2] = torch.where(owned, s.gather(1, safe), 0.0)
        e = s.exp_()
        e[where] = 0.0  # the tail sum never subtracts: no cancellation
        sums[:, -1] = e.sum(dim=-1)
        sums[:, -2] = sums[:, -1] + torch.where(owned, sums[:, :-2].exp(), 0.0).sum(dim=-1)  # one pass less
    else:
        e = s
    _reduce_tp(sums, group)
    log_z = sums[:, -2].log()  # [n]
    log_q = torch.cat([sums[:, :-2] - log_z[:, None], (sums[:, -1].log() - log_z)[:, None]], dim=1)
    return e, log_z, log_q, owned, where


_LARGE = 1e30
"""Per-row gradient factors beyond this (a tail the student all but excludes) are applied in float64."""


def _divergence(
    tail_exp: torch.Tensor,
    log_z: torch.Tensor,
    log_q: torch.Tensor,
    log_t: torch.Tensor,
    owned: torch.Tensor,
    where: tuple[torch.Tensor, torch.Tensor],
    *,
    kind: str,
    beta: float,
    grad_out: torch.Tensor | None,
) -> torch.Tensor:
    """Per-token loss [n] over the buckets; writes dL/ds (without the constant factor) into ``grad_out``.

    Every tail column's gradient is its ``p_S`` times one per-row coefficient ``a``, so it is written
    as ``tail_exp * (a / Z)`` (no further exponential); the top-k columns are then overwritten.
    """
    q, t = log_q.exp(), log_t.exp()  # [n, k + 1]
    q_empty = q == 0  # the student's tail at k = vocabulary (or underflow): 0 log 0 = 0
    if kind == "forward_kl":
        loss = torch.where(t > 0, t * (log_t - log_q), 0.0).sum(dim=-1)
        if grad_out is None:
            return loss
        # tail columns: p_S (1 - t_tail / q_tail); the ratio in float64 (it may exceed float32's range)
        ratio = torch.exp(log_t[:, -1].double() - log_q[:, -1].double())
        coef_tail = torch.where(t[:, -1] > 0, 1.0 - ratio, 1.0)
        coef_tail = torch.where(q_empty[:, -1], 0.0, coef_tail)  # no student mass there: gradient 0
        top = q[:, :-1] - t[:, :-1]  # p_S - p_T
    else:
        if kind == "reverse_kl":
            g = torch.where(q_empty, 0.0, log_q - log_t)
            loss = (q * g).sum(dim=-1)
            reference = loss
        elif beta in (0.0, 1.0):  # m equals one of the two distributions: the divergence vanishes
            if grad_out is not None:
                grad_out.zero_()
            return log_q.new_zeros(log_q.shape[0])
        else:
            log_m = torch.logaddexp(log_t + math.log(beta), log_q + math.log(1.0 - beta))
            kl_t = torch.where(t > 0, t * (log_t - log_m), 0.0).sum(dim=-1)
            g = torch.where(q_empty, 0.0, log_q - log_m)
            reference = (q * g).sum(dim=-1)  # KL(q || m)
            loss = beta * kl_t + (1.0 - beta) * reference
        if grad_out is None:
            return loss
        coef = g - reference[:, None]  # [n, k + 1]
        coef_tail = coef[:, -1].double()
        top = q[:, :-1] * coef[:, :-1]
    factor = coef_tail * torch.exp(-log_z.double())  # [n]: a / Z
    extreme = factor.abs() > _LARGE
    fixed = (tail_exp[extreme].double() * factor[extreme, None]).to(grad_out.dtype) if extreme.any() else None
    torch.mul(tail_exp, factor.float()[:, None], out=grad_out)  # in place when tail_exp is grad_out's storage
    if fixed is not None:
        grad_out[extreme] = fixed
    grad_out[where] = top[owned].to(grad_out.dtype)
    return loss


def _sampled_tail_divergence(
    student: torch.Tensor,
    ids: torch.Tensor,
    log_w: torch.Tensor,
    log_t: torch.Tensor,
    temperature: float,
    group,
    first_column: int,
    work: torch.Tensor | None,
    grad_out: torch.Tensor | None,
) -> torch.Tensor:
    """Forward KL against the teacher's top-k plus S tokens sampled from its tail, one [n, v_valid] chunk.

    ``log_w`` [n, c]: each cached column's weight in the estimate of the teacher's distribution (its
    probability for a top-k column, tail mass / S for a sampled one; duplicates add up), summing to 1;
    ``log_t`` [n, c]: the teacher's log-probability of each column's token. The estimate ``w`` is
    unbiased, ``E[w_j] = p_T[j]`` for every token, so the gradient ``p_S - w`` is an unbiased estimate of
    the full-vocabulary one, and the loss ``sum_c w_c (log p_T - log p_S)[id_c]`` of the full KL.
    """
    n, v = student.shape
    s, owned, safe = _shifted_student(student, ids, temperature, group, first_column, work)
    sums = torch.zeros(
        n, ids.shape[1] + 1, dtype=torch.float32, device=student.device
    )  # [columns' s | total]
    if v > 0:
        sums[:, :-1] = torch.where(owned, s.gather(1, safe), 0.0)
        sums[:, -1] = s.exp_().sum(dim=-1)
    _reduce_tp(sums, group)
    log_z = sums[:, -1].log()
    log_q = sums[:, :-1] - log_z[:, None]
    w = log_w.exp()
    loss = torch.where(w > 0, w * (log_t - log_q), 0.0).sum(dim=-1)
    if grad_out is not None:
        torch.mul(s, torch.exp(-log_z)[:, None], out=grad_out)  # p_S (s holds exp(s - max) by now)
        if v > 0:
            where = (owned.nonzero(as_tuple=True)[0], safe[owned])
            grad_out.index_put_(where, -w[owned].to(grad_out.dtype), accumulate=True)
    return loss


class _ChunkedTopKLoss(_ChunkedKDLoss):
    """Loss and student gradient chunk by chunk in forward; ``_ChunkedKDLoss.backward`` rescales the gradient."""

    @staticmethod
    def forward(
        ctx,
        student,
        ids,
        log_probs,
        tail,
        kind,
        temperature,
        beta,
        chunk_size,
        num_valid,
        first_column,
        group,
        need_grad,
        tail_samples,
    ):
        vocab = student.shape[-1]
        flat_s = student.reshape(-1, vocab)  # [tokens, v_local]
        columns = ids.shape[-1]
        flat_ids = ids.reshape(-1, columns).long()  # [tokens, k (+ S)]
        top = columns - tail_samples
        # the teacher's k + 1 buckets, renormalised (a half-precision cache sums to 1 only to ~1e-3)
        flat_lp = log_probs.reshape(-1, columns).float()
        log_t = torch.cat([flat_lp[:, :top], tail.reshape(-1, 1).float()], dim=1)
        norm = torch.logsumexp(log_t, dim=1, keepdim=True)
        log_t = log_t - norm
        if tail_samples:  # each sampled column carries 1/S of the tail mass (Eq. in the docstring above)
            log_w = torch.cat(
                [log_t[:, :-1], (log_t[:, -1:] - math.log(tail_samples)).expand(-1, tail_samples)], 1
            )
            log_t = torch.cat([log_t[:, :-1], flat_lp[:, top:] - norm], dim=1)
        tokens = flat_s.shape[0]
        loss = torch.empty(tokens, dtype=torch.float32, device=student.device)
        grad = None
        if need_grad:
            grad = torch.empty_like(flat_s) if num_valid == vocab else torch.zeros_like(flat_s)
        step = tokens if chunk_size <= 0 else chunk_size
        for start in range(0, tokens, max(step, 1)):
            stop = min(start + step, tokens)
            out = grad[start:stop, :num_valid] if need_grad else None
            work = out if out is not None and out.dtype == torch.float32 and out.is_contiguous() else None
            if tail_samples:
                loss[start:stop] = _sampled_tail_divergence(
                    flat_s[start:stop, :num_valid],
                    flat_ids[start:stop],
                    log_w[start:stop],
                    log_t[start:stop],
                    temperature,
                    group,
                    first_column,
                    work,
                    out,
                )
                continue
            buckets = _student_buckets(
                flat_s[start:stop, :num_valid], flat_ids[start:stop], temperature, group, first_column, work
            )
            loss[start:stop] = _divergence(
                *buckets[:3], log_t[start:stop], *buckets[3:], kind=kind, beta=beta, grad_out=out
            )
        ctx.save_for_backward(grad)
        ctx.shape = student.shape
        ctx.scale = (1.0 - beta if kind == "jsd" else 1.0) / temperature
        return loss.reshape(student.shape[:-1])


def vocab_parallel_topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    teacher_tail_log_mass: torch.Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
    tp_group=None,
    tail_samples: int = 0,
) -> torch.Tensor:
    """Per-token fp32 divergence ``[...]`` between the teacher's cached top-k and the student, same on every TP rank.

    ``student_logits``: ``[..., v_local]`` shards of the padded vocabulary; ``teacher_ids``: ``[..., k]``
    global token ids (distinct per token); ``teacher_log_probs``: ``[..., k]`` their log-probabilities
    at ``temperature``; ``teacher_tail_log_mass``: ``[...]`` log of the rest (``-inf`` when k covers
    the vocabulary). Other arguments as ``vocab_parallel_kd_loss``. Only the student gets a gradient.

    ``tail_samples`` S > 0: the last S of the k columns are tokens drawn from the teacher's tail
    (``vocab_parallel_topk_and_ce``'s ``tail_samples``; repeats allowed), each standing for 1/S of the
    tail mass: an unbiased estimate of the full forward KL and its gradient instead of the k + 1 buckets.
    """
    _check(
        kind,
        temperature,
        jsd_beta,
        student_logits,
        teacher_ids,
        teacher_log_probs,
        teacher_tail_log_mass,
        tail_samples,
    )
    local = student_logits.shape[-1]
    group, num_valid = vocab_shard(local, vocab_size, tp_group)
    first_column = (dist.get_rank(group) if group is not None else 0) * local  # of this rank's shard
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _ChunkedTopKLoss.apply(
        student_logits,
        teacher_ids.detach(),
        teacher_log_probs.detach(),
        teacher_tail_log_mass.detach(),
        kind,
        float(temperature),
        float(jsd_beta),
        int(chunk_size),
        num_valid,
        first_column,
        group,
        need_grad,
        int(tail_samples),
    )


@torch.no_grad()
def vocab_parallel_topk(
    logits: torch.Tensor, k: int, *, temperature: float = 1.0, vocab_size: int | None = None, tp_group=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k of ``[n, v_local]`` vocab-parallel logits: what the cache stores.

    Returns global ids ``[n, k]`` int64 (most likely first), their log-probabilities at
    ``temperature`` ``[n, k]`` fp32 and the log of the remaining mass ``[n]`` fp32 (``-inf`` when k
    covers the vocabulary); identical on every TP rank. ``tp_group`` None means no TP.
    """
    ids, log_probs, tail, _ = vocab_parallel_topk_and_ce(
        logits, k, temperature=temperature, vocab_size=vocab_size, tp_group=tp_group
    )
    return ids, log_probs, tail


@torch.no_grad()
def vocab_parallel_topk_and_ce(
    logits: torch.Tensor,
    k: int,
    *,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    tp_group=None,
    tail_samples: int = 0,
    draws: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``vocab_parallel_topk``'s three outputs and, with ``labels`` ``[n]``, the token CE ``[n]`` fp32.

    ``tail_samples`` S > 0 (with ``draws`` ``[n]``, uniform in [0, 1)): S more columns after the top-k,
    tokens drawn from the teacher's tail by systematic sampling (``_sample_tail``), with their
    log-probabilities; the ids and log-probabilities are then ``[n, k + S]``.

    The CE is megatron-core's ``vocab_parallel_cross_entropy`` (temperature 1, over every column of the
    padded shard, as the online teacher's validation CE) computed from the same passes over the logits:
    at temperature 1 the top-k's normaliser is reused (plus the few padding columns), so extracting a
    cached row reads the ``[n, v_local]`` logits four times (top-k, shift, exp, sum) instead of about
    ten. Equal to megatron-core's CE up to fp32 rounding (summation order); ``logits`` is not modified.
    """
    n, local = logits.shape
    rank, world = (dist.get_rank(tp_group), dist.get_world_size(tp_group)) if tp_group is not None else (0, 1)
    valid = local if vocab_size is None else max(0, min(local, vocab_size - rank * local))
    total_vocab = local * world if vocab_size is None else vocab_size
    if not 1 <= k <= total_vocab:
        raise ValueError(f"top-k {k} must be in [1, {total_vocab}] (the vocabulary)")
    device = logits.device
    shard = logits[:, :valid]
    # local candidates: this shard's best min(k, local) columns (-inf where it has fewer valid ones),
    # ranked on the raw logits (the order of (z - max) / T); the first is this shard's max
    width = min(k, local)
    values = torch.full((n, width), float("-inf"), device=device)
    columns = torch.zeros(n, width, dtype=torch.long, device=device)
    maxima = torch.full((n, 2), float("-inf"), device=device)  # [valid columns | all columns, for the CE]
    top = None
    if valid:
        top = torch.topk(shard, min(width, valid), dim=-1)
        maxima[:, 0] = top.values[:, 0].float()
    if labels is not None:
        maxima[:, 1] = maxima[:, 0]
        if local > valid:  # padding columns count in megatron-core's CE
            maxima[:, 1] = torch.maximum(maxima[:, 1], logits[:, valid:].amax(dim=-1).float())
    _reduce_tp(maxima, tp_group, op=dist.ReduceOp.MAX)
    row_max = maxima[:, :1]
    if top is not None:
        values[:, : top.values.shape[1]] = torch.sub(top.values, row_max).div_(temperature)
        columns[:, : top.indices.shape[1]] = top.indices + rank * local
    if tp_group is not None:
        gathered_v = [torch.empty_like(values) for _ in range(world)]
        gathered_c = [torch.empty_like(columns) for _ in range(world)]
        dist.all_gather(gathered_v, values, group=tp_group)
        dist.all_gather(gathered_c, columns, group=tp_group)
        values, columns = torch.cat(gathered_v, dim=1), torch.cat(gathered_c, dim=1)
    best = torch.topk(values, k, dim=-1)
    ids = columns.gather(1, best.indices)  # [n, k]
    local_ids = ids - rank * local
    mine = (local_ids >= 0) & (local_ids < valid)
    owned = torch.where(mine, best.values, float("-inf")).exp()  # [n, k]: exp of the top-k this rank holds
    sums = torch.zeros(n, 4, device=device)  # [total | tail | CE total at T = 1 | label logit - max]
    if valid:
        e = torch.sub(shard, row_max)  # fp32: the one copy
        if temperature != 1.0:
            e.div_(temperature)
        e.exp_()
        e[mine.nonzero(as_tuple=True)[0], local_ids[mine]] = 0.0  # the tail sum never subtracts
        if tail_samples:
            blocks = _block_sums(e)
            sums[:, 1] = blocks.sum(dim=-1)
        else:
            sums[:, 1] = e.sum(dim=-1)
        sums[:, 0] = sums[:, 1] + owned.sum(dim=-1)
    ce = None
    if labels is not None:
        ce_max = maxima[:, 1:]
        if temperature == 1.0:  # this shard's total, rescaled to the CE's max (equal unless padding wins)
            sums[:, 2] = sums[:, 0] * torch.exp(row_max - ce_max).squeeze(1)
        elif valid:
            sums[:, 2] = torch.sub(shard, ce_max).exp_().sum(dim=-1)
        if local > valid:
            sums[:, 2] += torch.sub(logits[:, valid:], ce_max).exp_().sum(dim=-1)
        target = labels.reshape(-1) - rank * local
        here = (target >= 0) & (target < local)
        picked = logits.gather(1, torch.where(here, target, 0)[:, None]).squeeze(1).float()
        sums[:, 3] = torch.where(here, picked - ce_max.squeeze(1), 0.0)
    _reduce_tp(sums, tp_group)
    log_z = sums[:, 0].log()
    if labels is not None:
        ce = sums[:, 2].log() - sums[:, 3]
    log_probs = best.values - log_z[:, None]
    if tail_samples:
        if draws is None or draws.shape != (n,):
            raise ValueError(f"tail_samples needs draws [{n}] (uniform in [0, 1)), got {draws}")
        sampled_ids, sampled_s = _sample_tail(
            e if valid else None,
            blocks if valid else None,
            draws.to(device=device, dtype=torch.float64),
            tail_samples,
            column_offset=rank * local,
            shard=shard,
            row_max=row_max,
            temperature=temperature,
            tp_group=tp_group,
        )
        ids = torch.cat([ids, sampled_ids], dim=1)
        log_probs = torch.cat([log_probs, sampled_s - log_z[:, None]], dim=1)
    return ids, log_probs, sums[:, 1].log() - log_z, ce


_TAIL_BLOCK: int | None = None
"""Columns per block when sampling the tail (a block's sum is found first, then the column inside it);
None: the power of two nearest sqrt(columns of the shard), so both searches stay small (tests set it)."""


def _tail_block(v: int) -> int:
    if _TAIL_BLOCK is not None:
        return _TAIL_BLOCK
    return 1 << max(3, round(math.log2(max(v, 1)) / 2))


def _block_sums(e: torch.Tensor) -> torch.Tensor:
    """``[n, ceil(v / block)]`` sums of consecutive column blocks of ``e`` ``[n, v]`` (the last one may be short)."""
    n, v = e.shape
    block = _tail_block(v)
    full = v // block
    parts = [e[:, : full * block].reshape(n, full, block).sum(dim=-1)] if full else []
    if v % block:
        parts.append(e[:, full * block :].sum(dim=-1, keepdim=True))
    return torch.cat(parts, dim=1)


def _sample_tail(
    e: torch.Tensor | None,
    blocks: torch.Tensor | None,
    draws: torch.Tensor,
    count: int,
    *,
    column_offset: int,
    shard: torch.Tensor,
    row_max: torch.Tensor,
    temperature: float,
    tp_group,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` tokens per row from the teacher's tail distribution, by systematic sampling, and their shifted logits.

    Systematic sampling: the points ``(u + i) / S`` (i < S, one uniform ``u`` per row from ``draws``)
    of the tail's cumulative mass, laid out over the vocabulary in column order (TP ranks in rank
    order), each pick the token whose interval holds it. Every token ``j`` is picked ``S p_j / P_tail``
    times in expectation (so weight ``P_tail / S`` per pick is unbiased) and never more than one away
    from that: less variance than independent draws, and no extra pass over the logits (the block sums
    are the tail sum's). ``e``: this rank's ``exp((z - max) / T)`` with the top-k zeroed (None: no
    valid column here), ``blocks`` its ``_block_sums``. Returns global ids ``[n, S]`` (int64) and
    ``(z - max) / T`` ``[n, S]``, identical on every TP rank.
    """
    n, device = draws.shape[0], draws.device
    block_ends = blocks.double().cumsum(dim=1) if blocks is not None else None  # [n, B]
    local_tail = (
        block_ends[:, -1] if block_ends is not None else torch.zeros(n, dtype=torch.float64, device=device)
    )
    if tp_group is not None:
        gathered = [torch.empty_like(local_tail) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(gathered, local_tail, group=tp_group)
        per_rank, rank = torch.stack(gathered, dim=1), dist.get_rank(tp_group)  # [n, ranks]
    else:
        per_rank, rank = local_tail[:, None], 0
    bounds = per_rank.cumsum(dim=1)  # where each rank's share of the tail mass ends, in rank order
    total = bounds[:, -1:]
    points = (draws[:, None] + torch.arange(count, device=device, dtype=torch.float64)) / count * total
    points = torch.minimum(points, torch.nextafter(total, torch.zeros_like(total)))  # [n, S], < total
    low = bounds[:, rank : rank + 1] - per_rank[:, rank : rank + 1]
    here = (points >= low) & (points < bounds[:, rank : rank + 1])
    found = torch.zeros(n, 2 * count, dtype=torch.float32, device=device)  # [global id | shifted logit]
    if e is not None and block_ends is not None and bool(here.any()):
        v = e.shape[1]
        width = _tail_block(v)
        rest = (points - low).clamp_min(0.0)  # mass into this rank's tail, [n, S]
        # the first block (then column) whose cumulative mass passes the point: never an empty one;
        # rounding past the end falls back to the last non-empty one
        last_block = torch.where(blocks > 0, torch.arange(blocks.shape[1], device=device), 0).amax(dim=1)
        block = torch.minimum(torch.searchsorted(block_ends, rest, right=True), last_block[:, None])
        before = torch.where(block > 0, block_ends.gather(1, (block - 1).clamp_min(0)), 0.0)
        columns = block[..., None] * width + torch.arange(width, device=device)  # [n, S, B]
        values = e.gather(1, columns.clamp(max=v - 1).reshape(n, -1)).reshape(columns.shape)
        values = torch.where(columns < v, values, 0.0)
        ends = values.double().cumsum(dim=-1)
        offset = torch.searchsorted(ends, (rest - before)[..., None], right=True).squeeze(-1)
        last = torch.where(values > 0, torch.arange(width, device=device), 0).amax(dim=-1)
        column = block * width + torch.minimum(offset, last)
        logit = shard.gather(1, column).float().sub_(row_max)
        if temperature != 1.0:
            logit.div_(temperature)
        found[:, :count] = torch.where(here, (column + column_offset).float(), 0.0)
        found[:, count:] = torch.where(here, logit, 0.0)
    _reduce_tp(found, tp_group)
    # no tail mass at all (the top-k holds every token of non-zero probability): the columns carry
    # weight 0 and say so with log-probability -inf (id 0 is a placeholder)
    logits = torch.where(total > 0, found[:, count:], float("-inf"))
    return found[:, :count].round().long(), logits


def reference_topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """The bucketed divergence in plain full-vocabulary PyTorch (autograd, no chunking, no TP): the tests' oracle.

    The teacher's top-k is taken from ``teacher_logits`` at ``temperature``.
    """
    if vocab_size is not None:
        student_logits, teacher_logits = student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    ids = torch.topk(log_pt, k, dim=-1).indices
    in_top = torch.zeros_like(log_pt, dtype=torch.bool).scatter_(-1, ids, True)

    def buckets(log_p):
        tail = torch.logsumexp(log_p.masked_fill(in_top, float("-inf")), dim=-1, keepdim=True)
        return torch.cat([log_p.gather(-1, ids), tail], dim=-1)

    log_q, log_t = buckets(log_ps), buckets(log_pt)
    q, t = log_q.exp(), log_t.exp()

    def kl(p, log_p, log_r):
        return torch.where(p > 0, p * (log_p - log_r), 0.0).sum(-1)

    if kind == "forward_kl":
        return kl(t, log_t, log_q)
    if kind == "reverse_kl":
        return kl(q, log_q, log_t)
    if jsd_beta in (0.0, 1.0):
        return (log_ps * 0).sum(-1)
    log_m = torch.logaddexp(log_t + math.log(jsd_beta), log_q + math.log(1.0 - jsd_beta))
    return jsd_beta * kl(t, log_t, log_m) + (1.0 - jsd_beta) * kl(q, log_q, log_m)


def reference_tail_samples(
    teacher_logits: torch.Tensor,
    k: int,
    count: int,
    draws: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """The tail tokens ``_sample_tail`` picks, by the textbook rule (float64, no blocks, no TP): the tests' oracle.

    ``teacher_logits`` ``[n, v]``; returns ``[n, count]`` ids: for each point ``(u + i) / count`` of the
    tail's total mass, the first column (in vocabulary order) whose cumulative tail mass exceeds it.
    """
    if vocab_size is not None:
        teacher_logits = teacher_logits[..., :vocab_size]
    p = F.softmax(teacher_logits.double() / temperature, dim=-1)
    top = torch.topk(teacher_logits, k, dim=-1).indices
    tail = p.scatter(-1, top, 0.0)
    ends = tail.cumsum(dim=-1)
    points = (draws.double()[:, None] + torch.arange(count, dtype=torch.float64)) / count * ends[:, -1:]
    return torch.searchsorted(ends, points, right=True)


def reference_sampled_tail_kd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    teacher_tail_log_mass: torch.Tensor,
    tail_samples: int,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """``vocab_parallel_topk_kd_loss(..., tail_samples=S)`` in plain PyTorch (autograd): the tests' oracle.

    ``sum_c w_c (log t_c - log p_S[id_c])`` with ``w`` the top-k probabilities and tail mass / S per
    sampled column, all renormalised together with the tail as the cache's half precision requires.
    """
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    top = teacher_ids.shape[-1] - tail_samples
    lp, tail = teacher_log_probs.float(), teacher_tail_log_mass.float()[..., None]
    norm = torch.logsumexp(torch.cat([lp[..., :top], tail], dim=-1), dim=-1, keepdim=True)
    log_t = lp - norm
    w = torch.cat(
        [log_t[..., :top].exp(), ((tail - norm).exp() / tail_samples).expand(*tail.shape[:-1], tail_samples)],
        -1,
    )
    log_q = log_ps.gather(-1, teacher_ids.long())
    return torch.where(w > 0, w * (log_t - log_q), 0.0).sum(-1)
