"""Which training samples a run can read at most, per domain: what a teacher cache must hold for it.

The mixing sampler (``mixing.py``) reads each domain's samples in a fixed order (epoch permutation
after epoch permutation) and only the *number* of draws depends on the weights. So a run that draws
at most ``n_d`` samples from domain d reads exactly ``first_draws(d, n_d)``, under any mixture, any
window layout, any DP layout and any resume. ``n_d`` is exact for a static mixture (cpt/kd, and the
``static`` / ``equal`` DDK ablations: the schedule is laid out in advance) and an upper bound for
DDK, whose weights are only known while it runs:

- window 0 uses Eq. 1, a softmax that can put almost all weight on one domain: every position;
- later windows with smoothing (``--ddk-mixing ddk``) give a domain at most ``alpha + (1 - alpha) / N``;
  megatron's greedy interleaving keeps every prefix within one sample of the weights (+2 here, to be safe);
- ``no-smoothing`` applies Eq. 1 every window: every position again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_ddk.data.mixing import DomainMixingSchedule


@dataclass(frozen=True, kw_only=True)
class RunDraws:
    """What decides how many samples a run draws from each domain (the flags of the same names)."""

    train_iters: int
    global_batch_size: int
    interval: int
    """--ddk-interval (K): the window is K x global batch positions."""
    seed: int
    mode: str = "ddk"
    """--ddk-mode: cpt / kd train on the static mixture, ddk on the dynamic one."""
    mixing: str = "ddk"
    alpha: float = 0.5


def max_draws(
    domain_sizes: Sequence[int], static_weights: Sequence[float], run: RunDraws
) -> tuple[np.ndarray, bool]:
    """(draws per domain [N] int64, exact): exactly what a static mixture draws, else an upper bound."""
    num_domains = len(domain_sizes)
    window = run.interval * run.global_batch_size
    total = run.train_iters * run.global_batch_size
    dynamic = run.mode == "ddk" and run.mixing in ("ddk", "no-smoothing")
    if not dynamic:
        equal = run.mode == "ddk" and run.mixing == "equal"
        weights = (
            np.full(num_domains, 1.0 / num_domains) if equal else np.asarray(static_weights, dtype=np.float64)
        )
        schedule = DomainMixingSchedule(
            domain_sizes, window_size=window, seed=run.seed, initial_weights=weights
        )
        full = total // window
        draws = schedule.offsets_at_window(full)
        if total % window:
            domains, _ = schedule.lookup(full * window, total)
            draws = draws + np.bincount(domains, minlength=num_domains)
        return draws.astype(np.int64), True
    w_max = 1.0 if run.mixing == "no-smoothing" else run.alpha + (1.0 - run.alpha) / num_domains
    draws = np.zeros(num_domains, dtype=np.int64)
    for start in range(0, total, window):
        length = min(window, total - start)
        bound = length if start == 0 else min(length, int(np.floor(w_max * length)) + 2)
        draws += bound
    return draws, False


def samples_a_run_can_draw(
    domain_sizes: Sequence[int], static_weights: Sequence[float], run: RunDraws
) -> tuple[list[np.ndarray], bool]:
    """Per domain, the sorted domain-local sample ids a run can read (see the module docstring); exact or bound."""
    draws, exact = max_draws(domain_sizes, static_weights, run)
    schedule = DomainMixingSchedule(
        domain_sizes, window_size=1, seed=run.seed, initial_weights=np.ones(len(domain_sizes))
    )
    samples = []
    for domain, count in enumerate(draws.tolist()):
        size = int(domain_sizes[domain])
        ids = np.arange(size) if count >= size else np.sort(schedule.first_draws(domain, count))
        samples.append(ids.astype(np.int64))
    return samples, exact


def first_samples(domain_sizes: Sequence[int], seed: int, count: int) -> list[np.ndarray]:
    """Per domain, the sorted ids of its first ``count`` draws: covers any run reading <= count samples of it."""
    schedule = DomainMixingSchedule(
        domain_sizes, window_size=1, seed=seed, initial_weights=np.ones(len(domain_sizes))
    )
    return [
        np.sort(np.unique(schedule.first_draws(d, min(count, int(size))))).astype(np.int64)
        for d, size in enumerate(domain_sizes)
    ]
