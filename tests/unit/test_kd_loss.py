"""The chunked KD losses equal a plain full-vocabulary PyTorch computation, values and gradients."""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_ddk.distill.kd_loss import KD_KINDS, reference_kd_loss, vocab_parallel_kd_loss


def logits(seed, shape=(5, 3, 40), scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def compare(kind, temperature, chunk, beta=0.4, vocab_size=None, dtype=torch.float32):
    s_ref = logits(0, dtype=dtype).requires_grad_()
    s_ours = s_ref.detach().clone().requires_grad_()
    t = logits(1, dtype=dtype)
    weights = torch.rand(5, 3, generator=torch.Generator().manual_seed(2))  # non-uniform upstream gradient
    ref = reference_kd_loss(s_ref, t, kind=kind, temperature=temperature, jsd_beta=beta, vocab_size=vocab_size)
    ours = vocab_parallel_kd_loss(s_ours, t, kind=kind, temperature=temperature, jsd_beta=beta, chunk_size=chunk,
                                  vocab_size=vocab_size)
    (ref * weights).sum().backward()
    (ours * weights).sum().backward()
    return ref, ours, s_ref.grad, s_ours.grad


@pytest.mark.parametrize("kind,temperature,chunk", list(itertools.product(KD_KINDS, [1.0, 2.0], [0, 4])))
def test_matches_reference(kind, temperature, chunk):
    ref, ours, g_ref, g_ours = compare(kind, temperature, chunk)
    assert ours.dtype == torch.float32 and ours.shape == (5, 3)
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)
    assert (ours > 0).all()


@pytest.mark.parametrize("kind", KD_KINDS)
def test_padding_columns_get_no_mass(kind):
    ref, ours, g_ref, g_ours = compare(kind, 1.0, 7, vocab_size=33)
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-6)
    assert torch.all(g_ours[..., 33:] == 0)
    torch.testing.assert_close(g_ours[..., :33], g_ref[..., :33], rtol=1e-5, atol=1e-7)


def test_identical_distributions_give_zero():
    x = logits(3)
    for kind in KD_KINDS:
        assert vocab_parallel_kd_loss(x.clone().requires_grad_(), x, kind=kind).abs().max() < 1e-6


def test_jsd_degenerate_betas_and_bf16():
    for beta in (0.0, 1.0):
        ref, ours, _, g = compare("jsd", 1.0, 3, beta=beta)
        assert ours.abs().max() == 0 and g.abs().max() == 0
    ref, ours, g_ref, g_ours = compare("forward_kl", 1.0, 4, dtype=torch.bfloat16)
    assert g_ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-4, atol=1e-5)


def test_teacher_gets_no_gradient():
    s, t = logits(0).requires_grad_(), logits(1).requires_grad_()
    vocab_parallel_kd_loss(s, t).sum().backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("kwargs,needle", [
    ({"kind": "kl"}, "--kd-loss-type"), ({"temperature": 0.0}, "--kd-temperature"), ({"jsd_beta": 1.5}, "--kd-jsd-beta")])
def test_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        vocab_parallel_kd_loss(logits(0), logits(1), **kwargs)
    with pytest.raises(ValueError, match="differ in shape"):
        vocab_parallel_kd_loss(logits(0), logits(1, shape=(5, 3, 41)))
