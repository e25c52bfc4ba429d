"""The chunked KD losses equal a plain full-vocabulary PyTorch computation, values and gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megatron_ddk.distill.kd_loss import KD_KINDS, reference_kd_loss, vocab_parallel_kd_loss

SHAPE = (7, 2, 40)  # [s, b, v]: 14 tokens, so a chunk of 3 leaves a ragged last chunk


def logits(seed, shape=SHAPE, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def compare(kind, temperature, chunk, beta=0.4, vocab_size=None, dtype=torch.float32):
    s_ref = logits(0, dtype=dtype).requires_grad_()
    s_ours = s_ref.detach().clone().requires_grad_()
    t = logits(1, dtype=dtype)
    t_before = t.clone()
    weights = torch.rand(
        SHAPE[:2], generator=torch.Generator().manual_seed(2)
    )  # non-uniform upstream gradient
    ref = reference_kd_loss(
        s_ref, t, kind=kind, temperature=temperature, jsd_beta=beta, vocab_size=vocab_size
    )
    ours = vocab_parallel_kd_loss(
        s_ours, t, kind=kind, temperature=temperature, jsd_beta=beta, chunk_size=chunk, vocab_size=vocab_size
    )
    assert torch.equal(t, t_before) and torch.equal(s_ours.detach(), s_ref.detach())  # inputs untouched
    (ref * weights).sum().backward()
    (ours * weights).sum().backward()
    return ref, ours, s_ref.grad, s_ours.grad


@pytest.mark.parametrize("kind,temperature,chunk", list(itertools.product(KD_KINDS, [1.0, 2.0], [0, 3])))
def test_matches_reference(kind, temperature, chunk):
    ref, ours, g_ref, g_ours = compare(kind, temperature, chunk)
    assert ours.dtype == torch.float32 and ours.shape == SHAPE[:2]
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)
    assert (ours > 0).all()


def test_hand_worked_values():
    # p_T = softmax([ln 3, 0]) = [3/4, 1/4], p_S = softmax([0, 0]) = [1/2, 1/2]
    student = torch.zeros(1, 1, 2, requires_grad=True)
    teacher = torch.tensor([[[math.log(3.0), 0.0]]])
    fkl = vocab_parallel_kd_loss(student, teacher, kind="forward_kl")
    assert fkl.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-6)
    fkl.sum().backward()
    torch.testing.assert_close(student.grad, torch.tensor([[[-0.25, 0.25]]]))  # p_S - p_T
    rkl = vocab_parallel_kd_loss(student.detach(), teacher, kind="reverse_kl")
    assert rkl.item() == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25), rel=1e-6)
    # temperature 2 without a T^2 factor: p_T = softmax([ln 3 / 2, 0]) = [sqrt3, 1] / (sqrt3 + 1)
    q = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0)
    fkl_t2 = vocab_parallel_kd_loss(student.detach(), teacher, kind="forward_kl", temperature=2.0)
    assert fkl_t2.item() == pytest.approx(q * math.log(2 * q) + (1 - q) * math.log(2 * (1 - q)), rel=1e-6)
    m = [0.5 * 0.75 + 0.5 * 0.5, 0.5 * 0.25 + 0.5 * 0.5]
    jsd = vocab_parallel_kd_loss(student.detach(), teacher, kind="jsd", jsd_beta=0.5)
    expected = 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])) + 0.5 * (
        0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    )
    assert jsd.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_padding_columns_get_no_mass(kind):
    ref, ours, g_ref, g_ours = compare(kind, 2.0, 3, vocab_size=33)
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-6)
    assert torch.all(g_ours[..., 33:] == 0)
    torch.testing.assert_close(g_ours[..., :33], g_ref[..., :33], rtol=1e-5, atol=1e-7)
    # whatever sits in the padding columns does not matter
    s, t = logits(0), logits(1)
    s2, t2 = s.clone(), t.clone()
    s2[..., 33:], t2[..., 33:] = 1e4, -7.0
    torch.testing.assert_close(
        vocab_parallel_kd_loss(s2, t2, kind=kind, vocab_size=33),
        vocab_parallel_kd_loss(s, t, kind=kind, vocab_size=33),
    )


def test_identical_distributions_give_zero():
    x = logits(3)
    for kind in KD_KINDS:
        student = x.clone().requires_grad_()
        loss = vocab_parallel_kd_loss(student, x, kind=kind, chunk_size=3)
        loss.sum().backward()
        assert loss.abs().max() < 1e-6 and student.grad.abs().max() < 1e-6


def test_jsd_degenerate_betas():
    for beta in (0.0, 1.0):
        ref, ours, _, g = compare("jsd", 1.0, 3, beta=beta)
        assert ref.abs().max() == 0 and ours.abs().max() == 0 and g.abs().max() == 0


@pytest.mark.parametrize("kind", KD_KINDS)
def test_bf16_inputs(kind):
    ref, ours, g_ref, g_ours = compare(kind, 1.0, 3, dtype=torch.bfloat16)
    assert ours.dtype == torch.float32 and g_ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-6)  # both compute in fp32
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-2, atol=1e-3)  # one bf16 rounding apart


def test_teacher_gets_no_gradient_and_no_grad_mode_keeps_none():
    s, t = logits(0).requires_grad_(), logits(1).requires_grad_()
    vocab_parallel_kd_loss(s, t).sum().backward()
    assert t.grad is None and s.grad is not None
    with torch.no_grad():
        out = vocab_parallel_kd_loss(s, t, kind="reverse_kl")
    assert not out.requires_grad
    torch.testing.assert_close(out, reference_kd_loss(s, t, kind="reverse_kl").detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"kind": "kl"}, "--kd-loss-type"),
        ({"temperature": 0.0}, "--kd-temperature"),
        ({"jsd_beta": 1.5}, "--kd-jsd-beta"),
        ({"vocab_size": 41}, "vocab_size 41"),
        ({"vocab_size": 0}, "vocab_size 0"),
    ],
)
def test_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        vocab_parallel_kd_loss(logits(0), logits(1), **kwargs)


def test_bad_shapes_and_all_problems_at_once():
    with pytest.raises(ValueError, match="differ in shape"):
        vocab_parallel_kd_loss(logits(0), logits(1, shape=(7, 2, 41)))
    with pytest.raises(ValueError, match="floating point"):
        vocab_parallel_kd_loss(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="--kd-loss-type.*--kd-temperature"):
        reference_kd_loss(logits(0), logits(1), kind="kl", temperature=-1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_only_the_student_gradient_is_kept_for_backward(dtype):
    saved = []

    def pack(x):
        saved.append((tuple(x.shape), x.dtype))
        return x

    s, t = logits(0, dtype=dtype).requires_grad_(), logits(1, dtype=dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = vocab_parallel_kd_loss(s, t, kind="jsd", chunk_size=3)
    assert saved == [
        ((SHAPE[0] * SHAPE[1], SHAPE[2]), dtype)
    ]  # one [tokens, v] gradient in the logits' dtype
    loss.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass per forward"):  # it was scaled in place
        loss.sum().backward()
