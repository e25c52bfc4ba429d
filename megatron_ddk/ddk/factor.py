"""The domain discrepancy factor of DDK (Liu et al. 2024, arXiv 2407.16154), as pure numpy functions.

Notation (paper, Sec. 3): N domains; ``ppl_S[i]`` / ``ppl_T[i]`` the student's / teacher's validation
perplexity on domain i, i.e. ``exp`` of the mean token cross-entropy (``ce``).

    Eq. 1   r_0[i]     = softmax_i( ppl_S[i] / ppl_T[i] )
    Eq. 2   psi[i]     = r_t[i] * exp( ppl_S[i] / ppl_T[i] )
            r_{t+1}[i] = alpha * psi[i] / sum_j psi[j] + (1 - alpha) / N

Numerics: the ratio is ``exp(ce_S - ce_T)`` and Eq. 1/2 exponentiate it once more, so a weak student
(ratio 1e3) overflows float64 if the equations are evaluated literally. The ratio is formed from the
CE difference clipped at ``MAX_LOG_RATIO``; the softmax / normalisation then runs in log space with
max-subtraction (a softmax is shift-invariant), so nothing overflows. Every returned weight is at
least ``MIN_WEIGHT``: a domain never vanishes from the mixture, and Eq. 2's product ``r_t * ...``
can never get stuck at 0 (alpha = 1 or no-smoothing could otherwise underflow a domain to 0 forever).

Beyond the paper (``ddk-*`` modes, docs/DDK.md). The ratio is ``exp(ce_S - ce_T)``, so one more unit of
capability gap multiplies it: a weak student or a coarse tokenizer gives ratios like 2 / 5 / 3 / 11, and
Eq. 1's softmax over them puts 99.6% on one domain while the others are forgotten. The variants change one
thing each, with ``g`` the exponent Eq. 1/2 apply (paper: ``g = ppl_S / ppl_T``):

    ddk-smooth0    r_0 = alpha * softmax(g) + (1 - alpha) / N         Eq. 2's uniform term on window 0 too
    ddk-tempered   g = (ppl_S / ppl_T) / tau                            a temperature on the ratios
    ddk-log        g = log(ppl_S / ppl_T) / tau = (ce_S - ce_T) / tau   ratios in log space: r_0 ~ ratio^(1/tau)
    ddk-bounded    r_{t+1} = r_t + min(1, delta / TV(r*, r_t)) * (r* - r_t)     r* the paper's weights;
                   TV(p, q) = sum|p - q| / 2; window 0 starts from the registry's weights
    ddk-robust     ddk-log with ddk-smooth0's window 0

``ddk-log`` is the mode docs/DDK.md recommends (measured with benchmarks/ddk_ablation.py).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from megatron_ddk.config import MIXING_MODES
from megatron_ddk.errors import ConfigError, DataError

__all__ = [
    "LOG_SPACE_MODES",
    "MAX_LOG_RATIO",
    "MAX_RATIO",
    "MIN_WEIGHT",
    "MIXING_MODES",
    "SMOOTH_FIRST_MODES",
    "TEMPERATURE_MODES",
    "apply_floor",
    "bounded_step",
    "exponent",
    "first_weights",
    "initial_factor",
    "next_weights",
    "perplexity_ratio",
    "smoothed_update",
    "total_variation",
]

MAX_LOG_RATIO = 50.0
"""ce_S - ce_T is clipped here (ratio ~5.2e21) before exponentiating: beyond it every ordering is decided."""
MAX_RATIO = float(np.exp(MAX_LOG_RATIO))
MIN_WEIGHT = 1e-4
"""Floor of every domain weight (absolute probability). With N >= 1 / MIN_WEIGHT domains the floor is
unreachable and the weights become uniform."""


def _vector(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D sequence (one value per domain), got shape {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(
            f"{name} must be finite, got {array.tolist()}; a NaN/inf validation loss means a "
            "diverged model or an empty validation set"
        )
    return array


def _ce_pair(ce_student: ArrayLike, ce_teacher: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s, t = _vector(ce_student, "ce_student"), _vector(ce_teacher, "ce_teacher")
    if s.shape != t.shape:
        raise ValueError(f"ce_student has {s.size} domains but ce_teacher has {t.size}")
    return s, t


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"--ddk-alpha must be in [0, 1], got {alpha}")


def perplexity_ratio(ce_student: ArrayLike, ce_teacher: ArrayLike) -> np.ndarray:
    """ppl_S / ppl_T per domain = exp(ce_S - ce_T), with the exponent clipped at ``MAX_LOG_RATIO``."""
    s, t = _ce_pair(ce_student, ce_teacher)
    return np.exp(np.minimum(s - t, MAX_LOG_RATIO))


def _softmax(logits: np.ndarray) -> np.ndarray:
    """exp(logits) / sum(exp(logits)), stably (max-subtraction)."""
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def apply_floor(weights: ArrayLike, floor: float = MIN_WEIGHT) -> np.ndarray:
    """Every weight >= ``floor``, sum 1, by mixing with the uniform distribution just enough.

    Mixing with uniform (rather than clamping) keeps the order of the domains and is exact: the
    smallest weight lands on the floor. If ``floor * N >= 1`` the result is uniform.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    n = w.size
    if n * floor >= 1.0:
        return np.full(n, 1.0 / n)
    smallest = w.min()
    if smallest >= floor:
        return w
    lam = (floor - smallest) / (1.0 / n - smallest)  # in (0, 1]
    mixed = (1.0 - lam) * w + lam / n
    return mixed / mixed.sum()


def initial_factor(ce_student: ArrayLike, ce_teacher: ArrayLike) -> np.ndarray:
    """Eq. 1: r_0 = softmax_i(ppl_S[i] / ppl_T[i]) (the softmax is over the ratios themselves)."""
    return apply_floor(_softmax(perplexity_ratio(ce_student, ce_teacher)))


def smoothed_update(
    r_prev: ArrayLike, ce_student: ArrayLike, ce_teacher: ArrayLike, *, alpha: float
) -> np.ndarray:
    """Eq. 2: psi = r_t * exp(ppl_S / ppl_T); r_{t+1} = alpha * psi / sum(psi) + (1 - alpha) / N.

    Computed as psi / sum(psi) = softmax(log r_t + ratio), so neither exp(ratio) nor the product overflows.
    """
    _check_alpha(alpha)
    r = _vector(r_prev, "r_prev")
    ratio = perplexity_ratio(ce_student, ce_teacher)
    if r.shape != ratio.shape:
        raise ValueError(f"r_prev has {r.size} domains but the validation losses have {ratio.size}")
    if np.any(r <= 0):
        raise ValueError(f"r_prev must be positive, got {r.tolist()}")
    psi = _softmax(np.log(r) + ratio)
    return apply_floor(alpha * psi + (1.0 - alpha) / r.size)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0 or not np.isfinite(temperature):
        raise ValueError(f"--ddk-temperature must be a finite number > 0, got {temperature}")


LOG_SPACE_MODES = ("ddk-log", "ddk-robust")
"""Modes whose exponent is the log ratio ``ce_S - ce_T`` (over tau) rather than the ratio."""
TEMPERATURE_MODES = ("ddk-tempered", *LOG_SPACE_MODES)
SMOOTH_FIRST_MODES = ("ddk-smooth0", "ddk-robust")
"""Modes that mix window 0's weights with uniform like Eq. 2 does for later windows."""


def exponent(mode: str, ce_student: ArrayLike, ce_teacher: ArrayLike, temperature: float = 1.0) -> np.ndarray:
    """``g``: what Eq. 1's softmax and Eq. 2's ``exp`` are applied to under ``mode`` (module docstring)."""
    _check_temperature(temperature)
    s, t = _ce_pair(ce_student, ce_teacher)
    if mode in LOG_SPACE_MODES:
        return np.minimum(s - t, MAX_LOG_RATIO) / temperature
    ratio = perplexity_ratio(s, t)
    return ratio / temperature if mode == "ddk-tempered" else ratio


def total_variation(p: ArrayLike, q: ArrayLike) -> float:
    """TV(p, q) = sum_i |p_i - q_i| / 2: the largest share of samples two mixtures assign differently."""
    return float(0.5 * np.abs(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64)).sum())


def bounded_step(r_prev: ArrayLike, target: ArrayLike, max_step: float) -> np.ndarray:
    """Move from ``r_prev`` towards ``target`` by at most ``max_step`` in total variation (a convex
    combination, so the result is a distribution and keeps the direction of the update)."""
    if not 0 < max_step <= 1:
        raise ValueError(f"--ddk-max-step must be in (0, 1], got {max_step}")
    prev, goal = np.asarray(r_prev, dtype=np.float64), np.asarray(target, dtype=np.float64)
    distance = total_variation(prev, goal)
    if distance <= max_step:
        return goal
    return apply_floor(prev + (max_step / distance) * (goal - prev))


def _check_mode(mode: str) -> None:
    if mode not in MIXING_MODES:
        raise ConfigError(f"--ddk-mixing {mode!r} is not one of {', '.join(MIXING_MODES)}")


def first_weights(mode: str, static_weights: ArrayLike, num_domains: int) -> np.ndarray:
    """Weights used before any evaluation: uniform for ``equal``, the registry's (normalised) otherwise.

    For ``ddk``, ``no-smoothing`` and the ``ddk-*`` modes with a teacher, the caller replaces them with Eq. 1 right after the
    evaluation at iteration 0; without a teacher (CPT) they stay.
    """
    _check_mode(mode)
    if num_domains < 1:
        raise ValueError(f"need at least one domain, got {num_domains}")
    if mode == "equal":
        return np.full(num_domains, 1.0 / num_domains)
    weights = _vector(static_weights, "static weights")
    if weights.size != num_domains or np.any(weights <= 0):
        raise DataError(
            f"static weights {weights.tolist()} must be {num_domains} positive numbers "
            "(one per domain of the registry)"
        )
    return weights / weights.sum()


def next_weights(
    mode: str,
    *,
    r_prev: ArrayLike | None,
    ce_student: ArrayLike,
    ce_teacher: ArrayLike,
    alpha: float,
    static_weights: ArrayLike,
    temperature: float = 1.0,
    max_step: float = 1.0,
) -> np.ndarray:
    """The mixture of the next interval under ``--ddk-mixing mode`` (the paper's method and its ablations).

    ``ddk``: Eq. 1 on the first call (``r_prev`` None), Eq. 2 afterwards; ``no-smoothing``: Eq. 1 every
    time (the paper's "w/o factor smoothing"); ``equal``: uniform (the paper's "ES"); ``static``: the
    registry's weights. The ``ddk-*`` modes (module docstring) take ``temperature`` (tau) and ``max_step``
    (delta). Inputs are validated in every mode, so a broken evaluation never passes silently.
    """
    _check_mode(mode)
    _check_alpha(alpha)
    _check_temperature(temperature)
    s, _ = _ce_pair(ce_student, ce_teacher)
    if mode == "equal":
        return np.full(s.size, 1.0 / s.size)
    if mode == "static":
        return first_weights("static", static_weights, s.size)
    if mode == "ddk-bounded":
        start = first_weights("static", static_weights, s.size) if r_prev is None else r_prev
        target = next_weights(
            "ddk",
            r_prev=r_prev,
            ce_student=ce_student,
            ce_teacher=ce_teacher,
            alpha=alpha,
            static_weights=static_weights,
        )
        return bounded_step(start, target, max_step)
    g = exponent(mode, ce_student, ce_teacher, temperature)
    if mode == "no-smoothing" or r_prev is None:
        weights = _softmax(g)  # Eq. 1 (on g)
        if mode in SMOOTH_FIRST_MODES:
            weights = alpha * weights + (1.0 - alpha) / s.size
        return apply_floor(weights)
    r = _vector(r_prev, "r_prev")
    if r.shape != s.shape:
        raise ValueError(f"r_prev has {r.size} domains but the validation losses have {s.size}")
    if np.any(r <= 0):
        raise ValueError(f"r_prev must be positive, got {r.tolist()}")
    return apply_floor(alpha * _softmax(np.log(r) + g) + (1.0 - alpha) / r.size)  # Eq. 2 (on g)
