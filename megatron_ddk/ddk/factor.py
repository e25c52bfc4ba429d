"""The domain discrepancy factor of DDK (Liu et al. 2024, arXiv 2407.16154), as pure functions.

Notation (paper, Sec. 3): N domains; ``ppl_S[i]`` / ``ppl_T[i]`` the student's / teacher's validation
perplexity on domain i, i.e. ``exp`` of the mean token cross-entropy.

    Eq. 1   r_0[i]     = softmax_i( ppl_S[i] / ppl_T[i] )
    Eq. 2   psi[i]     = r_t[i] * exp( ppl_S[i] / ppl_T[i] )
            r_{t+1}[i] = alpha * psi[i] / sum_j psi[j] + (1 - alpha) / N

Numerics: the ratio itself is ``exp(ce_S - ce_T)`` and is exponentiated once more by Eq. 1/2, so a
weak student (ratio 1e3) would overflow float64 if done literally. Everything is computed in log
space with max-subtraction (a softmax is shift-invariant), and the ratio is clipped at
``MAX_RATIO`` before it is used. Every weight is kept at or above ``MIN_WEIGHT`` (then renormalised):
a domain never disappears from the mixture, which also keeps Eq. 2's product from collapsing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megatron_ddk.config import MIXING_MODES
MAX_LOG_RATIO = 50.0
"""log(ppl_S / ppl_T) is clipped here (ratio ~5e21): beyond it every ordering is already decided."""
MAX_RATIO = float(np.exp(MAX_LOG_RATIO))
MIN_WEIGHT = 1e-4
"""Floor for every domain weight, as a fraction of the mixture."""


def _vector(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {array.tolist()}")
    return array


def perplexity_ratio(ce_student: Sequence[float], ce_teacher: Sequence[float]) -> np.ndarray:
    """ppl_S / ppl_T per domain from mean token cross-entropies, clipped at ``MAX_RATIO``."""
    s, t = _vector(ce_student, "ce_student"), _vector(ce_teacher, "ce_teacher")
    if s.shape != t.shape:
        raise ValueError(f"ce_student has {s.size} domains but ce_teacher has {t.size}")
    return np.exp(np.minimum(s - t, MAX_LOG_RATIO))


def _normalise_log(log_weights: np.ndarray) -> np.ndarray:
    """softmax of log weights, stably (max-subtraction)."""
    shifted = log_weights - log_weights.max()
    weights = np.exp(shifted)
    return weights / weights.sum()


def apply_floor(weights: np.ndarray, floor: float = MIN_WEIGHT) -> np.ndarray:
    """Raise every weight to at least ``floor`` while keeping the sum at 1 (exact for floor * N < 1)."""
    weights = np.asarray(weights, dtype=np.float64)
    n = weights.size
    if n * floor >= 1.0:
        return np.full(n, 1.0 / n)
    # mix with the uniform distribution just enough that the smallest weight reaches the floor
    smallest = weights.min()
    if smallest >= floor:
        return weights / weights.sum()
    lam = (floor - smallest) / (1.0 / n - smallest)
    mixed = (1.0 - lam) * weights + lam / n
    return mixed / mixed.sum()


def initial_factor(ce_student: Sequence[float], ce_teacher: Sequence[float]) -> np.ndarray:
    """Eq. 1: r_0 = softmax(ppl_S / ppl_T)."""
    return apply_floor(_normalise_log(perplexity_ratio(ce_student, ce_teacher)))


def smoothed_update(r_prev: Sequence[float], ce_student: Sequence[float], ce_teacher: Sequence[float], *,
                    alpha: float) -> np.ndarray:
    """Eq. 2: psi = r_t * exp(ppl_S / ppl_T); r_{t+1} = alpha * psi / sum(psi) + (1 - alpha) / N."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--ddk-alpha must be in [0, 1], got {alpha}")
    r = _vector(r_prev, "r_prev")
    ratio = perplexity_ratio(ce_student, ce_teacher)
    if r.shape != ratio.shape:
        raise ValueError(f"r_prev has {r.size} domains but the perplexities have {ratio.size}")
    if np.any(r <= 0):
        raise ValueError(f"r_prev must be positive, got {r.tolist()}")
    psi = _normalise_log(np.log(r) + ratio)  # psi / sum(psi), in log space
    return apply_floor(alpha * psi + (1.0 - alpha) / r.size)


def first_weights(mode: str, static_weights: Sequence[float], num_domains: int) -> np.ndarray:
    """Weights before any evaluation: uniform for ``equal``, the registry's otherwise."""
    _check_mode(mode)
    if mode == "equal":
        return np.full(num_domains, 1.0 / num_domains)
    weights = _vector(static_weights, "static_weights")
    if weights.size != num_domains or np.any(weights <= 0):
        raise ValueError(f"static weights {weights.tolist()} must be {num_domains} positive numbers")
    return weights / weights.sum()


def next_weights(mode: str, *, r_prev: Sequence[float] | None, ce_student: Sequence[float],
                 ce_teacher: Sequence[float], alpha: float, static_weights: Sequence[float]) -> np.ndarray:
    """The mixture for the next interval under ``--ddk-mixing mode`` (the paper's method and ablations).

    ``ddk``: Eq. 1 on the first call (``r_prev`` None), Eq. 2 afterwards; ``no-smoothing``: Eq. 1
    every time (the paper's "w/o factor smoothing"); ``equal``: uniform; ``static``: the registry's.
    """
    _check_mode(mode)
    n = len(ce_student)
    if mode == "equal":
        return np.full(n, 1.0 / n)
    if mode == "static":
        return first_weights("static", static_weights, n)
    if mode == "no-smoothing" or r_prev is None:
        return initial_factor(ce_student, ce_teacher)
    return smoothed_update(r_prev, ce_student, ce_teacher, alpha=alpha)


def _check_mode(mode: str) -> None:
    if mode not in MIXING_MODES:
        raise ValueError(f"--ddk-mixing {mode!r} is not one of {', '.join(MIXING_MODES)}")
