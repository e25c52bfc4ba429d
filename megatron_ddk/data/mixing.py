"""The DDK mixing sampler: a deterministic global sample stream whose domain mixture changes per window.

Position ``p`` of the global stream (``p = iteration * global_batch + k``) belongs to window
``p // window_size`` with ``window_size = K * global_batch``: the K iterations between two DDK updates.
A window is laid out when it is first read, with the weights fixed for it by then:

1. megatron-core's compiled ``build_blending_indices`` interleaves the domains over the whole window
   (greedy largest deficit: every prefix of the window is as close to the weights as integers allow);
2. the n-th draw ever from domain d is sample ``perm(d, epoch)[n % size_d]`` with
   ``epoch = n // size_d``: each domain continues where the previous window left it and starts a new
   shuffled epoch (a permutation seeded by ``(seed, d, epoch)``) only when it runs out, so no sample
   repeats within an epoch of its domain and none is skipped.

The state is the list of per-window weights plus how many windows were laid out; everything else is
recomputed from it, so a checkpoint holds a few numbers and a resumed run reads exactly the same stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_ddk.errors import CheckpointError

_MAX_DOMAINS = int(np.iinfo(np.int16).max)  # build_blending_indices stores domain ids as int16
_CACHED_WINDOWS = 2  # reads only ever touch the current window (and, at a boundary, the previous one)


class DomainMixingSchedule:
    """Maps global sample positions to (domain id, domain-local sample id), window by window."""

    def __init__(
        self,
        domain_sizes: Sequence[int],
        *,
        window_size: int,
        seed: int,
        initial_weights: Sequence[float] | np.ndarray,
    ):
        sizes = np.asarray(domain_sizes, dtype=np.int64)
        if sizes.ndim != 1 or sizes.size == 0 or np.any(sizes <= 0):
            raise ValueError(
                f"every domain needs at least one training sample, got sizes {list(domain_sizes)}"
            )
        if sizes.size > _MAX_DOMAINS:
            raise ValueError(f"at most {_MAX_DOMAINS} domains are supported, got {sizes.size}")
        if window_size <= 0:
            raise ValueError(
                f"window size (--ddk-interval x --global-batch-size) must be > 0, got {window_size}"
            )
        if seed < 0:
            raise ValueError(f"--seed must be >= 0 for the mixing sampler, got {seed}")
        self.domain_sizes = sizes
        self.window_size = int(window_size)
        self.seed = int(seed)
        self._weights: list[np.ndarray] = [self._check_weights(initial_weights)]
        """Weights of windows 0..len-1; entries past the laid-out windows are fixed but not read yet."""
        self._draws_before: list[np.ndarray] = [np.zeros(self.num_domains, dtype=np.int64)]
        """Entry j: per-domain draws made before window j; one entry more than windows laid out."""
        self._windows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def num_domains(self) -> int:
        return int(self.domain_sizes.size)

    def _check_weights(self, weights: Sequence[float] | np.ndarray) -> np.ndarray:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (self.num_domains,) or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(
                f"window weights must be {self.num_domains} positive finite numbers, got {list(weights)}"
            )
        return w / w.sum()

    # ------------------------------------------------------------------------------------ weights
    @property
    def num_windows_laid_out(self) -> int:
        return len(self._draws_before) - 1

    @property
    def weight_history(self) -> list[list[float]]:
        """Weights of every window laid out or explicitly fixed so far, in window order."""
        return [w.tolist() for w in self._weights]

    def set_window_weights(self, window: int, weights: Sequence[float] | np.ndarray) -> None:
        """Fix the weights of ``window``, which must not be laid out yet (none of its samples read).

        Windows between the last fixed one and ``window`` inherit the last fixed weights.
        """
        if window < self.num_windows_laid_out:
            raise ValueError(
                f"window {window} is already laid out (its samples may have been read); "
                "weights must be fixed before a window is first read"
            )
        checked = self._check_weights(weights)
        while len(self._weights) < window:
            self._weights.append(self._weights[-1])
        if window < len(self._weights):
            self._weights[window] = checked
        else:
            self._weights.append(checked)

    def weights_for_window(self, window: int) -> np.ndarray:
        """The weights ``window`` has (or will have if nothing is set before it is read)."""
        return self._weights[min(window, len(self._weights) - 1)].copy()

    # ------------------------------------------------------------------------------------- layout
    def window_of(self, position: int) -> int:
        return int(position) // self.window_size

    def _build(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """(domain id, per-domain draw number) of every position of ``window``: [window_size] each."""
        from megatron.core.datasets import helpers_cpp  # compiled; imported here to keep this module light

        domain_index = np.zeros(self.window_size, dtype=np.int16)
        draw_index = np.zeros(self.window_size, dtype=np.int64)
        helpers_cpp.build_blending_indices(
            domain_index,
            draw_index,
            self.weights_for_window(window),
            self.num_domains,
            self.window_size,
            False,
        )
        domains = domain_index.astype(np.int64)
        return domains, draw_index + self._draws_before[window][domains]

    def _lay_out_through(self, window: int) -> None:
        """Lay out every window up to ``window``, recording the weights each one used."""
        while self.num_windows_laid_out <= window:
            j = self.num_windows_laid_out
            if len(self._weights) <= j:
                self._weights.append(self._weights[-1])  # inherited: recorded for the checkpoint
            domains, draws = self._build(j)
            self._remember(j, domains, draws)
            self._draws_before.append(
                self._draws_before[j] + np.bincount(domains, minlength=self.num_domains)
            )

    def _remember(self, window: int, domains: np.ndarray, draws: np.ndarray) -> None:
        self._windows.pop(window, None)
        self._windows[window] = (domains, draws)  # dicts keep insertion order: the first key is the oldest
        while len(self._windows) > _CACHED_WINDOWS:
            del self._windows[next(iter(self._windows))]

    def _window(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        self._lay_out_through(window)
        if window not in self._windows:  # an old window read again (e.g. by a test): rebuild it
            self._remember(window, *self._build(window))
        return self._windows[window]

    def _permutation(self, domain: int, epoch: int) -> np.ndarray:
        key = (domain, epoch)
        if key not in self._perms:
            if len(self._perms) >= 2 * self.num_domains:  # at most a current and a next epoch per domain
                self._perms.clear()
            rng = np.random.default_rng([self.seed, domain, epoch])
            self._perms[key] = rng.permutation(int(self.domain_sizes[domain]))
        return self._perms[key]

    def lookup(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Domain ids and domain-local sample ids (int64, [stop - start] each) of positions ``[start, stop)``."""
        if not 0 <= start <= stop:
            raise ValueError(f"bad sample range [{start}, {stop})")
        positions = np.arange(start, stop, dtype=np.int64)
        domains = np.empty(positions.size, dtype=np.int64)
        draws = np.empty(positions.size, dtype=np.int64)
        windows = positions // self.window_size
        for window in np.unique(windows):
            mask = windows == window
            window_domains, window_draws = self._window(int(window))
            offsets = positions[mask] - int(window) * self.window_size
            domains[mask], draws[mask] = window_domains[offsets], window_draws[offsets]
        sizes = self.domain_sizes[domains]
        epochs, within = draws // sizes, draws % sizes
        samples = np.empty(positions.size, dtype=np.int64)
        for domain, epoch in {(int(d), int(e)) for d, e in zip(domains, epochs)}:
            mask = (domains == domain) & (epochs == epoch)
            samples[mask] = self._permutation(domain, epoch)[within[mask]]
        return domains, samples

    def first_draws(self, domain: int, count: int) -> np.ndarray:
        """Domain-local sample ids of the first ``count`` draws ever from ``domain``, in draw order
        (epoch after epoch), whatever the weights: what a run drawing ``count`` samples from it reads."""
        size = int(self.domain_sizes[domain])
        parts = [
            self._permutation(domain, epoch)[: min(size, count - epoch * size)]
            for epoch in range(-(-max(count, 0) // size))
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def window_counts(self, window: int) -> np.ndarray:
        """Samples drawn from each domain in ``window`` ([num_domains] int64)."""
        self._lay_out_through(window)
        return self._draws_before[window + 1] - self._draws_before[window]

    def offsets_at_window(self, window: int) -> np.ndarray:
        """Per-domain draws made before ``window`` starts ([num_domains] int64)."""
        if window > 0:
            self._lay_out_through(window - 1)
        return self._draws_before[window].copy()

    # -------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (lists, ints, floats) for a checkpoint's common state."""
        return {
            "domain_sizes": self.domain_sizes.tolist(),
            "window_size": self.window_size,
            "seed": self.seed,
            "weights": self.weight_history,
            "windows_laid_out": self.num_windows_laid_out,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved stream; refuses one built from other data, interval, batch size or seed."""
        missing = [
            k
            for k in ("domain_sizes", "window_size", "seed", "weights", "windows_laid_out")
            if k not in state
        ]
        if missing:
            raise CheckpointError(
                f"the checkpoint's mixing state lacks {', '.join(missing)}; was it written by megatron_ddk?"
            )
        if (list(state["domain_sizes"]), state["window_size"], state["seed"]) != (
            self.domain_sizes.tolist(),
            self.window_size,
            self.seed,
        ):
            raise CheckpointError(
                f"the checkpoint's sample stream (domain sizes {state['domain_sizes']}, window {state['window_size']}, "
                f"seed {state['seed']}) differs from this run's ({self.domain_sizes.tolist()}, {self.window_size}, "
                f"{self.seed}); resume with the same data, --ddk-interval, --global-batch-size and --seed"
            )
        weights = [self._check_weights(w) for w in state["weights"]]
        laid_out = int(state["windows_laid_out"])
        if not weights or not 0 <= laid_out <= len(weights):
            raise CheckpointError(
                f"the checkpoint's mixing state is inconsistent: {laid_out} windows laid out but "
                f"{len(weights)} weight vectors"
            )
        self._weights = weights
        self._windows.clear()
        self._draws_before = [np.zeros(self.num_domains, dtype=np.int64)]
        self._lay_out_through(
            laid_out - 1
        )  # recompute the offsets; also freezes those windows' weights again


def dp_micro_batch_indices(
    iteration: int, *, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> list[range]:
    """Global positions of this DP rank's micro-batches in ``iteration`` (Megatron's sampler order).

    The global batch ``[it * GBS, (it + 1) * GBS)`` is cut into steps of ``micro_batch_size * dp_size``
    consecutive positions; rank r takes the r-th ``micro_batch_size`` slice of every step.
    """
    if micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size:
        raise ValueError(
            f"bad data-parallel slice: --micro-batch-size {micro_batch_size}, rank {dp_rank} of {dp_size}"
        )
    step = micro_batch_size * dp_size
    if global_batch_size <= 0 or global_batch_size % step:
        raise ValueError(
            f"--global-batch-size {global_batch_size} is not a positive multiple of --micro-batch-size "
            f"{micro_batch_size} x data-parallel size {dp_size}"
        )
    base = iteration * global_batch_size + dp_rank * micro_batch_size
    return [range(base + k, base + k + micro_batch_size) for k in range(0, global_batch_size, step)]
