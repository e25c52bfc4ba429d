"""KD losses over vocab-parallel logits: exact under tensor parallelism, bounded memory, analytic gradients.

Shapes: logits are ``[..., v]`` (``[s, b, v]`` from megatron's output layer) where ``v`` is this TP
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

Memory: the forward walks ``chunk_size`` tokens at a time in fp32 (in-place where it can: at most
four ``[n, v]`` fp32 buffers live), computes the loss and the gradient of that chunk, and keeps only
the gradient (in the student logits' dtype). Backward scales it by the upstream per-token gradient.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

KD_KINDS = ("forward_kl", "reverse_kl", "jsd")


def _default_tp_group():
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_tensor_model_parallel_group()


def _check(kind: str, temperature: float, jsd_beta: float, student: torch.Tensor, teacher: torch.Tensor) -> None:
    problems = []
    if kind not in KD_KINDS:
        problems.append(f"--kd-loss-type {kind!r} is not one of {', '.join(KD_KINDS)}")
    if not temperature > 0:
        problems.append(f"--kd-temperature must be > 0, got {temperature}")
    if not 0.0 <= jsd_beta <= 1.0:
        problems.append(f"--kd-jsd-beta must be in [0, 1], got {jsd_beta}")
    if student.shape != teacher.shape:
        problems.append(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ "
                        "in shape; teacher and student must share the (padded) vocabulary and the batch")
    if student.dim() == 0 or not (student.is_floating_point() and teacher.is_floating_point()):
        problems.append(f"logits must be floating point [..., vocab] tensors, got {student.dtype} "
                        f"{tuple(student.shape)} and {teacher.dtype} {tuple(teacher.shape)}")
    if problems:
        raise ValueError("; ".join(problems))


def _log_softmax_pair(s: torch.Tensor, t: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place log-softmax of both [n, v_local] fp32 chunks over the vocabulary split across ``group``."""
    if group is None:
        return torch.log_softmax(s, dim=-1), torch.log_softmax(t, dim=-1)
    n = s.shape[0]
    if s.shape[-1] == 0:  # this rank holds only padding columns
        row_max = torch.full((2, n, 1), float("-inf"), dtype=s.dtype, device=s.device)
    else:
        row_max = torch.stack([s.max(dim=-1, keepdim=True).values, t.max(dim=-1, keepdim=True).values])
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)  # [2, n, 1]
    s.sub_(row_max[0])
    t.sub_(row_max[1])
    sum_exp = torch.stack([torch.exp(s).sum(dim=-1, keepdim=True), torch.exp(t).sum(dim=-1, keepdim=True)])
    dist.all_reduce(sum_exp, group=group)  # [2, n, 1]
    log_z = sum_exp.log_()
    return s.sub_(log_z[0]), t.sub_(log_z[1])


def _weighted_sum_(p: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """sum_j p[:, j] diff[:, j] -> [n]; overwrites ``diff`` with the terms (0 where p == 0: 0 log 0 = 0).

    In place so no extra [n, v] buffer; torch's pairwise sum keeps fp32 error ~1e-6 relative over
    150k columns (a BLAS dot product loses two more digits).
    """
    return diff.masked_fill_(p == 0, 0.0).mul_(p).sum(dim=-1)


def _sum_tp(x: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


def _chunk_loss_and_grad(s: torch.Tensor, t: torch.Tensor, *, kind: str, beta: float, group,
                         need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token loss [n] and dL/ds [n, v_local] for one chunk of tempered fp32 logits (consumed in place)."""
    log_ps, log_pt = _log_softmax_pair(s, t, group)
    del s, t
    if kind == "forward_kl":
        p_t = log_pt.exp()
        loss = _sum_tp(_weighted_sum_(p_t, log_pt.sub_(log_ps)), group)  # diff: log p_T - log p_S
        return loss, (log_ps.exp_().sub_(p_t) if need_grad else None)
    if kind == "reverse_kl":
        terms = log_pt.neg_().add_(log_ps)  # log p_S - log p_T, then p_S (log p_S - log p_T)
        p_s = log_ps.exp_()
        loss = _sum_tp(_weighted_sum_(p_s, terms), group)
        return loss, (terms.addcmul_(p_s, loss[:, None], value=-1.0) if need_grad else None)
    if beta in (0.0, 1.0):  # m equals one of the two distributions: the divergence vanishes
        return log_ps.new_zeros(log_ps.shape[0]), (torch.zeros_like(log_ps) if need_grad else None)
    log_m = log_pt + math.log(beta)
    torch.logaddexp(log_m, log_ps + math.log(1.0 - beta), out=log_m)  # log(beta p_T + (1 - beta) p_S)
    p_t = log_pt.exp()
    kl_t = _weighted_sum_(p_t, log_pt.sub_(log_m))
    del p_t, log_pt
    p_s = log_ps.exp()
    terms = log_ps.sub_(log_m)  # log p_S - log m, then p_S (log p_S - log m)
    del log_m
    kl = _sum_tp(torch.stack([kl_t, _weighted_sum_(p_s, terms)]), group)  # [2, n]: KL(p_T||m), KL(p_S||m)
    loss = beta * kl[0] + (1.0 - beta) * kl[1]
    return loss, (terms.addcmul_(p_s, kl[1][:, None], value=-1.0).mul_(1.0 - beta) if need_grad else None)


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
            # owned fp32 copies (never views of the caller's logits: the chunk math works in place)
            s = flat_s[start:stop, :num_valid].to(torch.float32, copy=True)
            t = flat_t[start:stop, :num_valid].to(torch.float32, copy=True)
            if temperature != 1.0:
                s.div_(temperature)
                t.div_(temperature)
            chunk_loss, chunk_grad = _chunk_loss_and_grad(s, t, kind=kind, beta=beta, group=group,
                                                          need_grad=need_grad)
            del s, t
            loss[start:stop] = chunk_loss
            if need_grad:
                if temperature != 1.0:
                    chunk_grad.div_(temperature)
                grad[start:stop, :num_valid] = chunk_grad
            del chunk_grad
        ctx.save_for_backward(grad)
        ctx.shape = student.shape
        return loss.reshape(student.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return (None,) * 9
        # used once (a second backward trips autograd's saved-tensor version check): scale in place
        grad.mul_(grad_output.reshape(-1, 1).to(grad.dtype))
        return grad.reshape(ctx.shape), None, None, None, None, None, None, None, None


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
    """Per-token fp32 divergence ``[...]`` (e.g. ``[s, b]``) between teacher and student, same on every TP rank.

    ``student_logits`` / ``teacher_logits``: ``[..., v_local]`` shards of the padded vocabulary (any
    float dtype); ``chunk_size``: tokens per chunk (<= 0: one chunk); ``vocab_size``: the true
    vocabulary (padding columns get no mass); ``tp_group``: defaults to megatron-core's
    tensor-parallel group when one is initialized. Only the student gets a gradient. The loss mask
    is the caller's business.
    """
    _check(kind, temperature, jsd_beta, student_logits, teacher_logits)
    group = tp_group if tp_group is not None else _default_tp_group()
    local = student_logits.shape[-1]
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    if vocab_size is not None and not 1 <= vocab_size <= local * world:
        raise ValueError(f"vocab_size {vocab_size} must be in [1, {local * world}] (the padded vocabulary: "
                         f"{local} logits per rank x {world} tensor-parallel ranks)")
    num_valid = local if vocab_size is None else max(0, min(local, vocab_size - rank * local))
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _ChunkedKDLoss.apply(student_logits, teacher_logits.detach(), kind, float(temperature),
                                float(jsd_beta), int(chunk_size), num_valid, group, need_grad)


def reference_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, kind: str = "forward_kl",
                      temperature: float = 1.0, jsd_beta: float = 0.5, vocab_size: int | None = None) -> torch.Tensor:
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
