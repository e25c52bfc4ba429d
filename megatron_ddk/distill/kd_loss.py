"""KD losses over vocab-parallel logits: exact under tensor parallelism, bounded memory, analytic gradients.

Shapes: logits are ``[..., v]`` (``[b, s, v]`` from megatron-core's GPTModel, which transposes its
output layer's ``[s, b, v]``; the same legend as ``training/step.py``) where ``v`` is this TP
rank's shard of the padded vocabulary; the global column of local column j is ``tp_rank * v + j``.
Columns >= the true vocabulary size are megatron's padding: they get no probability in either
model and no gradient. ``n`` below is the number of tokens in one chunk.

With ``s = z_S / T`` and ``t = z_T / T`` (temperature T), ``p_S = softmax(s)``, ``p_T = softmax(t)``
over the FULL vocabulary (log-sum-exp across the TP group: all-reduce MAX of the row max, then
all-reduce SUM of the shifted exponentials), per token:

    forward_kl  KL(p_T || p_S) = sum p_T (log p_T - log p_S)          (the paper's Eq. 3, default)
                dL/ds = p_S - p_T
    reverse_kl  KL(p_S || p_T) = sum p_S (log p_S - log p_T)
                dL/ds = p_S (log p_S - log p_T - KL)
    jsd(beta)   beta KL(p_T || m) + (1 - beta) KL(p_S || m),  m = beta p_T + (1 - beta) p_S
                dL/ds = (1 - beta) p_S (log p_S - log m - KL(p_S || m));  beta = 0 or 1 gives 0

and dL/dz_S = dL/ds / T. The value is the plain divergence of the tempered distributions (no T^2
factor: put it in the loss weight for Hinton's convention). Each rank computes the local shard's
part of every sum, all-reduced over TP, so every rank returns the same per-token value and the
gradient of the full-vocabulary loss restricted to its own columns.

Memory: the forward walks ``chunk_size`` tokens at a time in fp32 (in place where it can: at most
three ``[n, v]`` fp32 buffers live, four for JSD), computes the loss and ``dL/ds`` of that chunk,
and keeps only that gradient (in the student logits' dtype). Backward scales it in place by the
upstream per-token gradient times the constant factor (``1/T``, and ``1 - beta`` for JSD).

Logits must be finite (an ``-inf`` column makes ``0 * log 0`` a NaN); exclude vocabulary through
``vocab_size``, not by masking logits.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_ddk.errors import ConfigError

KD_KINDS = ("forward_kl", "reverse_kl", "jsd")
KD_CHUNK_LOGITS = 1 << 24
"""Default chunk: ~16M fp32 logits (64 MiB) per temporary buffer; see docs/KD_LOSS.md."""


def default_chunk_size(vocab_columns: int) -> int:
    """Tokens per chunk when none is given (``--kd-chunk-size``): ``KD_CHUNK_LOGITS`` logits of the
    local vocabulary shard, e.g. 110 tokens for Qwen's 151936 columns at TP=1, 220 at TP=2."""
    return max(1, KD_CHUNK_LOGITS // max(vocab_columns, 1))


def _check(
    kind: str, temperature: float, jsd_beta: float, student: torch.Tensor, teacher: torch.Tensor
) -> None:
    problems = []
    if kind not in KD_KINDS:
        problems.append(f"--kd-loss-type {kind!r} is not one of {', '.join(KD_KINDS)}")
    if not temperature > 0:
        problems.append(f"--kd-temperature must be > 0, got {temperature}")
    if not 0.0 <= jsd_beta <= 1.0:
        problems.append(f"--kd-jsd-beta must be in [0, 1], got {jsd_beta}")
    if student.shape != teacher.shape:
        problems.append(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ "
            "in shape; teacher and student must share the (padded) vocabulary and the batch"
        )
    if student.dim() == 0 or not (student.is_floating_point() and teacher.is_floating_point()):
        problems.append(
            f"logits must be floating point [..., vocab] tensors, got {student.dtype} "
            f"{tuple(student.shape)} and {teacher.dtype} {tuple(teacher.shape)}"
        )
    if problems:
        raise ConfigError("; ".join(problems))


def _tempered_log_probs(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, group
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(z / T) in fp32 of both [n, v_local] chunks over the vocabulary split across ``group``.

    Results are fresh buffers (never the caller's logits, which later steps overwrite in place).
    """
    if group is None:
        return _local_log_softmax(student, temperature), _local_log_softmax(teacher, temperature)
    n = student.shape[0]
    if student.shape[-1] == 0:  # this rank holds only padding columns
        row_max = torch.full((2, n, 1), float("-inf"), dtype=torch.float32, device=student.device)
    else:
        row_max = torch.stack(
            [student.amax(dim=-1, keepdim=True), teacher.amax(dim=-1, keepdim=True)]
        ).float()
    _reduce_tp(row_max, group, op=dist.ReduceOp.MAX)  # [2, n, 1]; max(z / T) = max(z) / T as T > 0
    s, t = torch.sub(student, row_max[0]), torch.sub(teacher, row_max[1])  # fp32 by promotion: the copy
    if temperature != 1.0:
        s.div_(temperature)
        t.div_(temperature)
    sum_exp = torch.stack([torch.exp(s).sum(dim=-1, keepdim=True), torch.exp(t).sum(dim=-1, keepdim=True)])
    log_z = _reduce_tp(sum_exp, group).log_()  # [2, n, 1]
    return s.sub_(log_z[0]), t.sub_(log_z[1])


def _local_log_softmax(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Fused fp32 log-softmax of one [n, v] chunk (no TP): reads bf16/fp32 logits directly at T = 1."""
    if temperature != 1.0:  # z / T in fp32: one pass from fp32 logits, an upcast and a pass from bf16
        x = x / temperature if x.dtype == torch.float32 else x.float().div_(temperature)
    return torch.log_softmax(x, dim=-1, dtype=torch.float32)


def _reduce_tp(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce the per-rank partial ``x`` over the TP group (in place; a no-op without TP)."""
    if group is not None:
        dist.all_reduce(x, op=op, group=group)
    return x


def _divergence(
    log_ps: torch.Tensor,
    log_pt: torch.Tensor,
    *,
    kind: str,
    beta: float,
    group,
    grad_out: torch.Tensor | None,
) -> torch.Tensor:
    """Per-token loss [n] from the log-probabilities [n, v_local], which it overwrites.

    When ``grad_out`` ([n, v_local], any float dtype) is given, writes dL/ds into it, without the
    constant factor the backward applies (1/T, and 1 - beta for JSD). Sums use torch's pairwise
    reduction on in-place elementwise terms: ~1e-6 relative over 150k columns and no extra buffer.
    """
    if kind == "forward_kl":
        p_t = log_pt.exp()
        loss = _reduce_tp(torch.sub(log_pt, log_ps, out=log_pt).mul_(p_t).sum(dim=-1), group)
        if grad_out is not None:
            torch.sub(log_ps.exp_(), p_t, out=grad_out)  # p_S - p_T
        return loss
    if kind == "reverse_kl":
        terms = torch.sub(log_ps, log_pt, out=log_pt)  # log p_S - log p_T
        p_s = log_ps.exp_()
        loss = _reduce_tp(terms.mul_(p_s).sum(dim=-1), group)
        if grad_out is not None:
            torch.addcmul(terms, p_s, loss[:, None], value=-1.0, out=grad_out)  # p_S (log p_S - log p_T - KL)
        return loss
    if beta in (0.0, 1.0):  # m equals one of the two distributions: the divergence vanishes
        if grad_out is not None:
            grad_out.zero_()
        return log_ps.new_zeros(log_ps.shape[0])
    # log m = log(beta p_T + (1 - beta) p_S) = log(1 - beta) + logaddexp(log p_T + log(beta / (1 - beta)), log p_S)
    log_m = torch.add(log_pt, math.log(beta / (1.0 - beta)))
    torch.logaddexp(log_m, log_ps, out=log_m).add_(math.log(1.0 - beta))
    p_t = log_pt.exp()
    kl_t = torch.sub(log_pt, log_m, out=log_pt).mul_(p_t).sum(dim=-1)
    del p_t, log_pt
    p_s = log_ps.exp()
    terms = torch.sub(log_ps, log_m, out=log_ps)  # log p_S - log m
    del log_m
    kl = _reduce_tp(torch.stack([kl_t, terms.mul_(p_s).sum(dim=-1)]), group)  # [2, n]: KL(p_T||m), KL(p_S||m)
    if grad_out is not None:
        torch.addcmul(
            terms, p_s, kl[1][:, None], value=-1.0, out=grad_out
        )  # p_S (log p_S - log m - KL(p_S||m))
    return beta * kl[0] + (1.0 - beta) * kl[1]


class _ChunkedKDLoss(torch.autograd.Function):
    """Loss and student gradient computed chunk by chunk in forward; backward only rescales the gradient."""

    @staticmethod
    def forward(ctx, student, teacher, kind, temperature, beta, chunk_size, num_valid, group, need_grad):
        vocab = student.shape[-1]
        flat_s = student.reshape(-1, vocab)  # [tokens, v_local]
        flat_t = teacher.reshape(-1, vocab)
        tokens = flat_s.shape[0]
        loss = torch.empty(tokens, dtype=torch.float32, device=student.device)
        grad = None
        if need_grad:
            grad = torch.empty_like(flat_s) if num_valid == vocab else torch.zeros_like(flat_s)
        step = tokens if chunk_size <= 0 else chunk_size
        for start in range(0, tokens, max(step, 1)):
            stop = min(start + step, tokens)
            # no names kept for the log-probabilities: _divergence frees each buffer when done with it
            loss[start:stop] = _divergence(
                *_tempered_log_probs(
                    flat_s[start:stop, :num_valid], flat_t[start:stop, :num_valid], temperature, group
                ),
                kind=kind,
                beta=beta,
                group=group,
                grad_out=grad[start:stop, :num_valid] if need_grad else None,
            )
        ctx.save_for_backward(grad)
        ctx.shape = student.shape
        ctx.scale = (1.0 - beta if kind == "jsd" else 1.0) / temperature  # dL/dz_S = scale * stored dL/ds
        return loss.reshape(student.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if getattr(ctx, "spent", False):
            raise RuntimeError(
                "vocab_parallel_kd_loss supports one backward pass per forward (its stored "
                "gradient is scaled in place); run the forward again instead of retain_graph=True"
            )
        ctx.spent = True
        (grad,) = ctx.saved_tensors
        if grad is None:
            return (None,) * len(ctx.needs_input_grad)
        # [tokens, 1] in the gradient's dtype: a mixed-dtype in-place product would make CPU kernels
        # allocate [tokens, v_local] fp32 temporaries
        factor = (grad_output.reshape(-1, 1).float() * ctx.scale).to(grad.dtype)
        grad.mul_(factor)  # [tokens, v_local], in place: autograd gets this very buffer, no second copy
        # the student is the first input; the sparse top-k loss (topk_kd_loss.py) reuses this backward
        return (grad.reshape(ctx.shape),) + (None,) * (len(ctx.needs_input_grad) - 1)


def vocab_shard(local: int, vocab_size: int | None, tp_group) -> tuple[object | None, int]:
    """The TP group to reduce over (None: this rank holds the whole vocabulary) and how many of this
    rank's ``local`` logit columns are real tokens (the rest is the padded vocabulary's tail)."""
    group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    if vocab_size is not None and not 1 <= vocab_size <= local * world:
        raise ValueError(
            f"vocab_size {vocab_size} must be in [1, {local * world}] (the padded vocabulary: "
            f"{local} logits per rank x {world} tensor-parallel ranks)"
        )
    return group, local if vocab_size is None else max(0, min(local, vocab_size - rank * local))


def vocab_parallel_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
    tp_group=None,
) -> torch.Tensor:
    """Per-token fp32 divergence ``[...]`` (e.g. ``[b, s]``) between teacher and student, same on every TP rank.

    ``student_logits`` / ``teacher_logits``: ``[..., v_local]`` shards of the padded vocabulary (any
    float dtype); ``chunk_size``: tokens per chunk (<= 0: one chunk); ``vocab_size``: the true
    vocabulary (padding columns get no mass); ``tp_group``: the tensor-parallel group the vocabulary
    is split over (the caller's ``pg.tp``; None: the logits hold the whole vocabulary). Only the
    student gets a gradient. The loss mask
    is the caller's business.
    """
    _check(kind, temperature, jsd_beta, student_logits, teacher_logits)
    group, num_valid = vocab_shard(student_logits.shape[-1], vocab_size, tp_group)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _ChunkedKDLoss.apply(
        student_logits,
        teacher_logits.detach(),
        kind,
        float(temperature),
        float(jsd_beta),
        int(chunk_size),
        num_valid,
        group,
        need_grad,
    )


def reference_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Plain full-vocabulary PyTorch (autograd, no chunking, no TP): the tests' and benchmark's baseline."""
    _check(kind, temperature, jsd_beta, student_logits, teacher_logits)
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
        teacher_logits = teacher_logits[..., :vocab_size]
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        return F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
    if kind == "reverse_kl":
        return F.kl_div(log_pt, log_ps, reduction="none", log_target=True).sum(-1)
    if jsd_beta in (0.0, 1.0):
        return (log_ps * 0).sum(-1)
    log_m = torch.logaddexp(log_pt + math.log(jsd_beta), log_ps + math.log(1.0 - jsd_beta))
    kl_t = F.kl_div(log_m, log_pt, reduction="none", log_target=True).sum(-1)
    kl_s = F.kl_div(log_m, log_ps, reduction="none", log_target=True).sum(-1)
    return jsd_beta * kl_t + (1.0 - jsd_beta) * kl_s
