"""KD losses over vocab-parallel logits: exact under tensor parallelism, bounded memory, analytic gradients.

Shapes: ``[..., v]`` logits where ``v`` is this TP rank's shard of the (padded) vocabulary; the
global column of local column j is ``tp_rank * v + j``. Columns >= the true vocabulary size are
megatron's padding: they get no probability mass in either model and no gradient.

With ``s = z_S / T`` and ``t = z_T / T`` (temperature T), ``p_S = softmax(s)``, ``p_T = softmax(t)``
over the FULL vocabulary (log-sum-exp all-reduced across the TP group: MAX of the row max, then SUM of
the shifted exponentials), per token:

    forward_kl  KL(p_T || p_S) = sum p_T (log p_T - log p_S)          (the paper's Eq. 3, default)
                d/ds = p_S - p_T
    reverse_kl  KL(p_S || p_T) = sum p_S (log p_S - log p_T)
                d/ds = p_S * (log p_S - log p_T - KL)
    jsd(beta)   beta KL(p_T || m) + (1 - beta) KL(p_S || m),  m = beta p_T + (1 - beta) p_S
                d/ds = (1 - beta) p_S * (log p_S - log m - KL(p_S || m));  beta = 0 or 1 gives 0

The value is the plain divergence of the tempered distributions (no T^2 factor; scale it in the
loss weight if you want Hinton's convention); gradients w.r.t. the logits carry the 1/T.

Memory: the forward walks ``chunk_size`` tokens at a time in fp32, computes the loss and the
gradient of that chunk, and keeps only the gradient (in the student logits' dtype). A naive
implementation keeps fp32 copies of both logits, both log-softmaxes and the elementwise terms for
the whole micro-batch until backward.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

KD_KINDS = ("forward_kl", "reverse_kl", "jsd")


def _default_tp_group():
    try:
        from megatron.core import parallel_state
    except ImportError:  # pragma: no cover - megatron-core is a hard dependency
        return None
    if not parallel_state.model_parallel_is_initialized():
        return None
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_tensor_model_parallel_group()


def _check(kind: str, temperature: float, jsd_beta: float, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if kind not in KD_KINDS:
        raise ValueError(f"--kd-loss-type {kind!r} is not one of {', '.join(KD_KINDS)}")
    if not temperature > 0:
        raise ValueError(f"--kd-temperature must be > 0, got {temperature}")
    if not 0.0 <= jsd_beta <= 1.0:
        raise ValueError(f"--kd-jsd-beta must be in [0, 1], got {jsd_beta}")
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ in "
                         "shape; teacher and student must share the (padded) vocabulary and the batch")


def _log_softmax(x: torch.Tensor, group) -> torch.Tensor:
    """log softmax over the vocabulary split across ``group`` (x: [n, v_local] fp32)."""
    if group is None:
        return torch.log_softmax(x, dim=-1)
    if x.shape[-1] == 0:  # this rank holds only padding columns
        row_max = torch.full((x.shape[0], 1), float("-inf"), dtype=x.dtype, device=x.device)
    else:
        row_max = x.max(dim=-1, keepdim=True).values
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    sum_exp = torch.exp(x - row_max).sum(dim=-1, keepdim=True)
    dist.all_reduce(sum_exp, group=group)
    return x - row_max - torch.log(sum_exp)


def _sum_tp(x: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


def _xlogy_diff(p: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum p * (log_a - log_b) over the last dim, treating 0 * anything as 0."""
    return torch.where(p > 0, p * (log_a - log_b), torch.zeros_like(p)).sum(dim=-1)


def _chunk_loss_and_grad(s: torch.Tensor, t: torch.Tensor, *, kind: str, temperature: float, beta: float,
                         group, need_grad: bool):
    """Per-token loss [n] and d loss / d z_S [n, v_local] for one chunk of fp32 tempered logits."""
    log_ps, log_pt = _log_softmax(s, group), _log_softmax(t, group)
    p_s, p_t = log_ps.exp(), log_pt.exp()
    grad = None
    if kind == "forward_kl":
        loss = _sum_tp(_xlogy_diff(p_t, log_pt, log_ps), group)
        if need_grad:
            grad = p_s - p_t
    elif kind == "reverse_kl":
        loss = _sum_tp(_xlogy_diff(p_s, log_ps, log_pt), group)
        if need_grad:
            grad = torch.where(p_s > 0, p_s * (log_ps - log_pt - loss[:, None]), torch.zeros_like(p_s))
    else:
        if beta in (0.0, 1.0):  # m equals one of the two distributions: the divergence vanishes
            return torch.zeros(s.shape[0], dtype=torch.float32, device=s.device), (
                torch.zeros_like(s) if need_grad else None)
        log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log(1.0 - beta))
        kl_t = _sum_tp(_xlogy_diff(p_t, log_pt, log_m), group)
        kl_s = _sum_tp(_xlogy_diff(p_s, log_ps, log_m), group)
        loss = beta * kl_t + (1.0 - beta) * kl_s
        if need_grad:
            grad = (1.0 - beta) * torch.where(p_s > 0, p_s * (log_ps - log_m - kl_s[:, None]), torch.zeros_like(p_s))
    if grad is not None:
        grad = grad / temperature
    return loss, grad


class _ChunkedKDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, kind, temperature, beta, chunk_size, num_valid, group):
        vocab = student.shape[-1]
        flat_s = student.reshape(-1, vocab)
        flat_t = teacher.reshape(-1, vocab)
        n = flat_s.shape[0]
        need_grad = ctx.needs_input_grad[0]
        loss = torch.empty(n, dtype=torch.float32, device=student.device)
        grad = torch.zeros_like(flat_s) if need_grad else None
        step = n if chunk_size <= 0 else chunk_size
        for start in range(0, n, max(step, 1)):
            stop = min(start + step, n)
            s = flat_s[start:stop, :num_valid].float() / temperature
            t = flat_t[start:stop, :num_valid].float() / temperature
            chunk_loss, chunk_grad = _chunk_loss_and_grad(s, t, kind=kind, temperature=temperature, beta=beta,
                                                          group=group, need_grad=need_grad)
            loss[start:stop] = chunk_loss
            if need_grad:
                grad[start:stop, :num_valid] = chunk_grad.to(grad.dtype)
        ctx.save_for_backward(grad if need_grad else None)
        ctx.shape = student.shape
        return loss.reshape(student.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return (None,) * 8
        grad.mul_(grad_output.reshape(-1, 1).to(grad.dtype))  # used once: scale in place, no second copy
        return grad.reshape(ctx.shape), None, None, None, None, None, None, None


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
    """Per-token fp32 divergence ``[...]`` between teacher and student, identical on every TP rank.

    ``student_logits`` / ``teacher_logits``: ``[..., v_local]`` shards of the padded vocabulary;
    ``vocab_size``: the true vocabulary (padding columns get no mass); ``tp_group``: defaults to
    megatron-core's tensor-parallel group when one exists. The loss mask is the caller's business.
    """
    _check(kind, temperature, jsd_beta, student_logits, teacher_logits)
    group = tp_group if tp_group is not None else _default_tp_group()
    local = student_logits.shape[-1]
    rank = dist.get_rank(group) if group is not None else 0
    num_valid = local if vocab_size is None else max(0, min(local, vocab_size - rank * local))
    return _ChunkedKDLoss.apply(student_logits, teacher_logits.detach(), kind, float(temperature), float(jsd_beta),
                                int(chunk_size), num_valid, group)


def reference_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, kind: str = "forward_kl",
                      temperature: float = 1.0, jsd_beta: float = 0.5, vocab_size: int | None = None) -> torch.Tensor:
    """Plain full-vocabulary PyTorch (autograd, no chunking): the tests' and benchmark's baseline."""
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
