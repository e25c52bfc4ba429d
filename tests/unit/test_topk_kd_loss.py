"""The sparse top-k KD loss equals the bucketed full-vocabulary reference, and the full KD loss when k = vocabulary."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megatron_ddk.distill import topk_kd_loss
from megatron_ddk.distill.kd_loss import KD_KINDS, reference_kd_loss
from megatron_ddk.distill.topk_kd_loss import (
    reference_sampled_tail_kd_loss,
    reference_tail_samples,
    reference_topk_kd_loss,
    vocab_parallel_topk,
    vocab_parallel_topk_and_ce,
    vocab_parallel_topk_kd_loss,
)

SHAPE = (7, 2, 40)  # [s, b, v]: 14 tokens, so a chunk of 3 leaves a ragged last chunk


def logits(seed, shape=SHAPE, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def cached_topk(teacher, k, temperature, vocab_size=None):
    ids, logp, tail = vocab_parallel_topk(
        teacher.reshape(-1, teacher.shape[-1]), k, temperature=temperature, vocab_size=vocab_size
    )
    lead = teacher.shape[:-1]
    return ids.reshape(*lead, k), logp.reshape(*lead, k), tail.reshape(lead)


def compare(kind, temperature, chunk, k, *, vocab_size=None, beta=0.4, reference=None):
    student, teacher = logits(0), logits(1)
    weights = torch.rand(
        SHAPE[:2], generator=torch.Generator().manual_seed(2)
    )  # non-uniform upstream gradient
    s_ref = student.clone().requires_grad_()
    if reference is None:
        ref = reference_topk_kd_loss(
            s_ref, teacher, k, kind=kind, temperature=temperature, jsd_beta=beta, vocab_size=vocab_size
        )
    else:
        ref = reference(
            s_ref, teacher, kind=kind, temperature=temperature, jsd_beta=beta, vocab_size=vocab_size
        )
    (ref * weights).sum().backward()
    s_ours = student.clone().requires_grad_()
    ours = vocab_parallel_topk_kd_loss(
        s_ours,
        *cached_topk(teacher, k, temperature, vocab_size),
        kind=kind,
        temperature=temperature,
        jsd_beta=beta,
        chunk_size=chunk,
        vocab_size=vocab_size,
    )
    (ours * weights).sum().backward()
    return ref.detach(), ours.detach(), s_ref.grad, s_ours.grad


@pytest.mark.parametrize(
    "kind,temperature,chunk,k", list(itertools.product(KD_KINDS, [1.0, 2.0], [0, 3], [1, 5]))
)
def test_matches_bucketed_reference(kind, temperature, chunk, k):
    ref, ours, g_ref, g_ours = compare(kind, temperature, chunk, k)
    assert ours.dtype == torch.float32 and ours.shape == SHAPE[:2]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)
    assert (ours > 0).all()


@pytest.mark.parametrize("kind", KD_KINDS)
def test_padding_columns_get_no_mass_and_no_gradient(kind):
    ref, ours, g_ref, g_ours = compare(kind, 1.0, 4, 6, vocab_size=33)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours[..., :33], g_ref[..., :33], rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(g_ours[..., 33:]) == 0


@pytest.mark.parametrize(
    "kind,temperature,vocab_size",
    [("forward_kl", 1.0, None), ("forward_kl", 2.0, 33), ("reverse_kl", 1.0, None), ("jsd", 1.5, 33)],
)
def test_k_equal_to_vocabulary_is_the_online_loss(kind, temperature, vocab_size):
    k = vocab_size or SHAPE[-1]
    ref, ours, g_ref, g_ours = compare(
        kind, temperature, 5, k, vocab_size=vocab_size, reference=reference_kd_loss
    )
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)


def test_topk_extraction():
    teacher = logits(3).reshape(-1, SHAPE[-1])
    ids, logp, tail = vocab_parallel_topk(teacher, 4, temperature=2.0, vocab_size=35)
    log_p = torch.log_softmax(teacher[:, :35] / 2.0, dim=-1)
    top = torch.topk(log_p, 4, dim=-1)
    assert torch.equal(ids, top.indices)
    torch.testing.assert_close(logp, top.values)
    rest = torch.logsumexp(log_p.scatter(-1, top.indices, float("-inf")), dim=-1)
    torch.testing.assert_close(tail, rest)
    _, _, empty = vocab_parallel_topk(teacher, 35, vocab_size=35)
    assert torch.isinf(empty).all() and (empty < 0).all()
    with pytest.raises(ValueError, match="top-k 36"):
        vocab_parallel_topk(teacher, 36, vocab_size=35)


def test_half_precision_cache_and_bf16_student():
    """A cache stored in fp16 (as on disk) against bf16 logits stays close to the fp32 computation."""
    student, teacher = logits(0), logits(1)
    ids, logp, tail = cached_topk(teacher, 8, 1.0)
    exact = vocab_parallel_topk_kd_loss(student, ids, logp, tail)
    lossy = vocab_parallel_topk_kd_loss(student.bfloat16(), ids.int(), logp.half(), tail.half())
    torch.testing.assert_close(lossy, exact, rtol=2e-2, atol=1e-2)


def test_hand_worked_values():
    # p_T = softmax([ln 6, ln 3, 0]) = [0.6, 0.3, 0.1], top-1 = {0}, tail 0.4; p_S uniform: q = [1/3, 2/3]
    student = torch.zeros(1, 3, requires_grad=True)
    teacher = torch.tensor([[math.log(6.0), math.log(3.0), 0.0]])
    ids, logp, tail = vocab_parallel_topk(teacher, 1)
    loss = vocab_parallel_topk_kd_loss(student, ids, logp, tail)
    assert loss.item() == pytest.approx(0.6 * math.log(0.6 * 3) + 0.4 * math.log(0.4 * 3 / 2), rel=1e-6)
    loss.sum().backward()
    # top-1 column: p_S - p_T = 1/3 - 0.6; tail columns: p_S (1 - t_tail / q_tail) = 1/3 (1 - 0.4 / (2/3))
    torch.testing.assert_close(student.grad, torch.tensor([[1 / 3 - 0.6, 1 / 3 * 0.4, 1 / 3 * 0.4]]))


def test_bad_inputs():
    student = logits(0)
    ids, logp, tail = cached_topk(logits(1), 3, 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        vocab_parallel_topk_kd_loss(student, ids[:, :1], logp[:, :1], tail[:, :1])
    with pytest.raises(ValueError, match="kd-loss-type"):
        vocab_parallel_topk_kd_loss(student, ids, logp, tail, kind="mse")


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("vocab_size", [None, 35])
def test_extraction_ce_is_megatron_cross_entropy(temperature, vocab_size):
    """The cache tool's CE: temperature 1 over every column of the padded shard (megatron-core's definition,
    which the online teacher's validation CE uses), whichever column holds the row's max."""
    teacher = logits(5).reshape(-1, SHAPE[-1])
    teacher[::3, -1] = 20.0  # a padding column (with vocab_size 35) is the max of some rows
    labels = torch.randint(
        0, vocab_size or SHAPE[-1], (teacher.shape[0],), generator=torch.Generator().manual_seed(6)
    )
    before = teacher.clone()
    ids, logp, tail, ce = vocab_parallel_topk_and_ce(
        teacher, 4, labels=labels, temperature=temperature, vocab_size=vocab_size
    )
    assert torch.equal(teacher, before)  # the logits are read, not modified
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(teacher, labels, reduction="none"))
    for ours, theirs in zip(
        (ids, logp, tail), vocab_parallel_topk(teacher, 4, temperature=temperature, vocab_size=vocab_size)
    ):
        assert torch.equal(ours, theirs)


# ------------------------------------------------------------------------ sampled tail (--tail-samples)
def sampled(teacher, k, count, draws, temperature=1.0, vocab_size=None):
    return vocab_parallel_topk_and_ce(
        teacher, k, temperature=temperature, vocab_size=vocab_size, tail_samples=count, draws=draws
    )[:3]


@pytest.mark.parametrize("block", [4, 7, 256, None])  # short last block; one partial block; by sqrt
@pytest.mark.parametrize(("temperature", "vocab_size"), [(1.0, None), (2.0, 35)])
def test_tail_samples_follow_systematic_sampling(monkeypatch, block, temperature, vocab_size):
    monkeypatch.setattr(topk_kd_loss, "_TAIL_BLOCK", block)
    teacher = logits(7).reshape(-1, SHAPE[-1])
    draws = torch.rand(teacher.shape[0], generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    ids, logp, tail = sampled(teacher, 5, 6, draws, temperature, vocab_size)
    assert ids.shape == logp.shape == (teacher.shape[0], 11)
    expected = reference_tail_samples(teacher, 5, 6, draws, temperature=temperature, vocab_size=vocab_size)
    assert torch.equal(ids[:, 5:], expected)
    assert not (ids[:, 5:, None] == ids[:, None, :5]).any()  # never a top-k token
    log_p = torch.log_softmax(teacher[:, :vocab_size] / temperature, dim=-1)
    torch.testing.assert_close(logp, log_p.gather(1, ids))
    # the top-k part is what a cache without tail samples holds (the tail summed block by block)
    assert torch.equal(ids[:, :5], vocab_parallel_topk(teacher, 5, vocab_size=vocab_size)[0])
    for ours, theirs in zip(
        (ids[:, :5], logp[:, :5], tail),
        vocab_parallel_topk(teacher, 5, temperature=temperature, vocab_size=vocab_size),
    ):
        torch.testing.assert_close(ours, theirs)


def test_tail_sample_weights_are_unbiased():
    """Averaged over draws, top-k probabilities plus tail mass / S per pick give the teacher's distribution
    (a 5-standard-error test per token), so the sampled-tail KD gradient, ``p_S - w``, averages to the
    full-vocabulary one, and the loss to the full KL."""
    rows, n, k, count = 3, 4000, 4, 4
    teacher = logits(9, (rows, 40), scale=2.0)
    p = torch.softmax(teacher.double(), dim=-1)
    repeated = teacher.repeat_interleave(n, dim=0)
    draws = torch.rand(repeated.shape[0], generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    ids, logp, tail = sampled(repeated, k, count, draws)
    w = torch.cat([logp[:, :k].exp(), (tail.exp() / count)[:, None].expand(-1, count)], dim=1).double()
    estimate = torch.zeros_like(repeated, dtype=torch.float64).scatter_add_(1, ids, w).reshape(rows, n, -1)
    mean = estimate.mean(dim=1)
    # systematic sampling picks a tail token floor(x) or ceil(x) times, x = S p_j / P_tail: the weight's
    # standard deviation is (P_tail / S) sqrt(f (1 - f)), f the fractional part of x
    top = torch.topk(teacher, k, dim=-1).indices
    tail_p = p.scatter(1, top, 0.0)
    x = count * tail_p / tail_p.sum(1, keepdim=True)
    f = x - x.floor()
    error = tail_p.sum(1, keepdim=True) / count * (f * (1 - f)).sqrt() / math.sqrt(n)
    assert ((mean - p).abs() <= 5 * error + 1e-6).all(), ((mean - p).abs() / error).max()

    student = logits(11, (rows, 40)).requires_grad_()
    loss = vocab_parallel_topk_kd_loss(
        student.repeat_interleave(n, dim=0), ids, logp, tail, tail_samples=count
    )
    loss.mean().backward()
    p_s = torch.softmax(student.detach().double(), dim=-1)
    torch.testing.assert_close(student.grad.double(), (p_s - mean) / rows, atol=1e-6, rtol=0)
    per_draw = loss.detach().double().reshape(rows, n)
    full_kl = reference_kd_loss(student.detach(), teacher).double()
    assert ((per_draw.mean(1) - full_kl).abs() <= 5 * per_draw.std(1) / math.sqrt(n) + 1e-5).all()


@pytest.mark.parametrize(("temperature", "chunk", "vocab_size"), [(1.0, 0, None), (2.0, 3, 35), (1.0, 5, 35)])
def test_sampled_tail_loss_matches_reference(temperature, chunk, vocab_size):
    student, teacher = logits(0), logits(1)
    flat = teacher.reshape(-1, SHAPE[-1])
    draws = torch.rand(flat.shape[0], generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    ids, logp, tail = (
        x.reshape(*SHAPE[:2], *x.shape[1:]) for x in sampled(flat, 6, 5, draws, temperature, vocab_size)
    )
    logp, tail = logp.half(), tail.half()  # as stored
    weights = torch.rand(SHAPE[:2], generator=torch.Generator().manual_seed(2))
    s_ref, s_ours = student.clone().requires_grad_(), student.clone().requires_grad_()
    ref = reference_sampled_tail_kd_loss(
        s_ref, ids, logp, tail, 5, temperature=temperature, vocab_size=vocab_size
    )
    ours = vocab_parallel_topk_kd_loss(
        s_ours,
        ids,
        logp,
        tail,
        temperature=temperature,
        chunk_size=chunk,
        vocab_size=vocab_size,
        tail_samples=5,
    )
    (ref * weights).sum().backward()
    (ours * weights).sum().backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_ours.grad, s_ref.grad, rtol=1e-5, atol=1e-7)
    if vocab_size:
        assert (s_ours.grad[..., vocab_size:] == 0).all()


def test_rows_without_tail_mass_get_weightless_columns():
    """A teacher so sure that its tail underflows to 0: the sampled columns have log-probability -inf, and
    the loss is the top-k's alone (no NaN)."""
    teacher = logits(13).reshape(-1, SHAPE[-1])
    teacher[0, 3] = 1000.0  # row 0: every other token underflows
    draws = torch.full((teacher.shape[0],), 0.25, dtype=torch.float64)
    ids, logp, tail = sampled(teacher, 2, 3, draws)
    assert torch.isinf(tail[0]) and (logp[0, 2:] == float("-inf")).all()
    assert torch.isfinite(logp[1:]).all()
    student = logits(14).reshape(-1, SHAPE[-1]).requires_grad_()
    loss = vocab_parallel_topk_kd_loss(student, ids, logp.half(), tail.half(), tail_samples=3)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(student.grad).all()
    row0 = torch.log_softmax(student.detach()[0].float(), dim=-1)
    assert loss[0].item() == pytest.approx(-row0[3].item(), rel=1e-5)  # KL to a one-hot teacher


def test_sampled_tail_refusals():
    teacher = logits(1).reshape(-1, SHAPE[-1])
    draws = torch.full((teacher.shape[0],), 0.5, dtype=torch.float64)
    ids, logp, tail = sampled(teacher, 3, 2, draws)
    student = logits(0).reshape(-1, SHAPE[-1])
    with pytest.raises(ValueError, match="serves forward_kl only"):
        vocab_parallel_topk_kd_loss(student, ids, logp, tail, kind="reverse_kl", tail_samples=2)
    with pytest.raises(ValueError, match="tail_samples 5 must be in"):
        vocab_parallel_topk_kd_loss(student, ids, logp, tail, tail_samples=5)
    with pytest.raises(ValueError, match="needs draws"):
        vocab_parallel_topk_and_ce(teacher, 3, tail_samples=2)
