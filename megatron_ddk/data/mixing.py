"""The DDK mixing sampler: a deterministic global sample stream whose domain mixture changes per window.

Position ``p`` of the global stream (``p = iteration * global_batch + k``) belongs to window
``p // window_size`` with ``window_size = K * global_batch``: the K iterations between two DDK
updates. A window is laid out when it is first read, with the weights fixed for it at that moment:

1. megatron-core's compiled ``build_blending_indices`` interleaves the domains for the whole window
   (greedy largest-deficit: every prefix of the window is as close to the weights as integers allow);
2. the n-th draw ever from domain d is sample ``perm(d, epoch)[n % size_d]`` with
   ``epoch = n // size_d``: each domain continues where the previous window left it and starts a new
   shuffled epoch (a fresh permutation seeded by ``(seed, d, epoch)``) only when it runs out, so no
   sample repeats within an epoch of its domain and none is skipped.

The only state is the list of per-window weights; everything else is recomputed from it, so a
checkpoint holds a few numbers and a resumed run reads exactly the same stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class DomainMixingSchedule:
    def __init__(self, domain_sizes: Sequence[int], *, window_size: int, seed: int,
                 initial_weights: Sequence[float]):
        self.domain_sizes = np.asarray(domain_sizes, dtype=np.int64)
        if self.domain_sizes.ndim != 1 or self.domain_sizes.size == 0 or np.any(self.domain_sizes <= 0):
            raise ValueError(f"every domain needs at least one training sample, got sizes {list(domain_sizes)}")
        if window_size <= 0:
            raise ValueError(f"window size must be > 0, got {window_size}")
        self.window_size = int(window_size)
        self.seed = int(seed)
        self._weights: list[np.ndarray] = [self._check_weights(initial_weights)]
        """weights of windows 0..len-1; the last entry may not be laid out yet."""
        self._laid_out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._draws_before: list[np.ndarray] = [np.zeros(self.num_domains, dtype=np.int64)]
        """per-domain draws made before window j (index j), for every window laid out so far + 1."""
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    @property
    def num_domains(self) -> int:
        return int(self.domain_sizes.size)

    def _check_weights(self, weights) -> np.ndarray:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (self.num_domains,) or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"window weights must be {self.num_domains} positive finite numbers, got {list(weights)}")
        return w / w.sum()

    # ------------------------------------------------------------------------------------ weights
    @property
    def num_windows_laid_out(self) -> int:
        return len(self._draws_before) - 1

    def set_window_weights(self, window: int, weights: Sequence[float]) -> None:
        """Fix the weights of ``window``: only a window none of whose samples has been read yet."""
        if window < self.num_windows_laid_out:
            raise ValueError(f"window {window} is already laid out (its samples may have been read); "
                             "weights must be fixed before a window is first read")
        checked = self._check_weights(weights)
        while len(self._weights) < window:
            self._weights.append(self._weights[-1])  # windows in between inherit
        if window < len(self._weights):
            self._weights[window] = checked
        else:
            self._weights.append(checked)

    def weights_for_window(self, window: int) -> np.ndarray:
        return self._weights[min(window, len(self._weights) - 1)].copy()

    @property
    def weight_history(self) -> list[list[float]]:
        return [w.tolist() for w in self._weights]

    # ------------------------------------------------------------------------------------- layout
    def window_of(self, position: int) -> int:
        return int(position) // self.window_size

    def _layout(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """(domain id, per-domain draw number) of every position in ``window``."""
        while self.num_windows_laid_out <= window:
            j = self.num_windows_laid_out
            weights = self.weights_for_window(j)
            if len(self._weights) <= j:
                self._weights.append(weights)  # record the inherited weights for the checkpoint
            from megatron.core.datasets import helpers_cpp

            domain_index = np.zeros(self.window_size, dtype=np.int16)
            draw_index = np.zeros(self.window_size, dtype=np.int64)
            helpers_cpp.build_blending_indices(domain_index, draw_index, weights, self.num_domains,
                                               self.window_size, False)
            draws = draw_index + self._draws_before[j][domain_index]
            self._laid_out[j] = (domain_index.astype(np.int64), draws)
            counts = np.bincount(domain_index, minlength=self.num_domains)
            self._draws_before.append(self._draws_before[j] + counts)
            for old in [w for w in self._laid_out if w < j - 1]:
                del self._laid_out[old]  # only the current and previous window are ever read
        if window not in self._laid_out:
            self._relayout(window)
        return self._laid_out[window]

    def _relayout(self, window: int) -> None:
        from megatron.core.datasets import helpers_cpp

        domain_index = np.zeros(self.window_size, dtype=np.int16)
        draw_index = np.zeros(self.window_size, dtype=np.int64)
        helpers_cpp.build_blending_indices(domain_index, draw_index, self.weights_for_window(window),
                                           self.num_domains, self.window_size, False)
        self._laid_out[window] = (domain_index.astype(np.int64), draw_index + self._draws_before[window][domain_index])

    def _permutation(self, domain: int, epoch: int) -> np.ndarray:
        key = (domain, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 4 * self.num_domains:
                self._perm_cache.clear()
            rng = np.random.default_rng([self.seed, domain, epoch])
            self._perm_cache[key] = rng.permutation(int(self.domain_sizes[domain]))
        return self._perm_cache[key]

    def lookup(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Domain ids and domain-local sample ids of global positions ``[start, stop)``."""
        positions = np.arange(start, stop, dtype=np.int64)
        domains = np.empty(positions.size, dtype=np.int64)
        samples = np.empty(positions.size, dtype=np.int64)
        for window in np.unique(positions // self.window_size):
            mask = positions // self.window_size == window
            domain_index, draws = self._layout(int(window))
            offsets = positions[mask] - int(window) * self.window_size
            d, n = domain_index[offsets], draws[offsets]
            domains[mask] = d
            sizes = self.domain_sizes[d]
            epochs, within = n // sizes, n % sizes
            samples[mask] = [self._permutation(int(di), int(e))[w] for di, e, w in zip(d, epochs, within)]
        return domains, samples

    def window_counts(self, window: int) -> np.ndarray:
        """Samples drawn from each domain in ``window``."""
        self._layout(window)
        return self._draws_before[window + 1] - self._draws_before[window]

    def offsets_at_window(self, window: int) -> np.ndarray:
        """Per-domain draws made before ``window`` starts."""
        if window > 0:
            self._layout(window - 1)
        return self._draws_before[window].copy()

    # -------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"domain_sizes": self.domain_sizes.tolist(), "window_size": self.window_size, "seed": self.seed,
                "weights": self.weight_history}

    def load_state_dict(self, state: dict) -> None:
        if state["domain_sizes"] != self.domain_sizes.tolist() or state["window_size"] != self.window_size \
                or state["seed"] != self.seed:
            raise ValueError(
                f"the checkpoint's sample stream (domain sizes {state['domain_sizes']}, window {state['window_size']}, "
                f"seed {state['seed']}) differs from this run's ({self.domain_sizes.tolist()}, {self.window_size}, "
                f"{self.seed}); resume with the same data, --ddk-interval, --global-batch-size and --seed"
            )
        self._weights = [self._check_weights(w) for w in state["weights"]]
        self._laid_out.clear()
        self._draws_before = [np.zeros(self.num_domains, dtype=np.int64)]
        # windows whose weights were recorded are those laid out before the save; redo their counts now
        recorded = len(self._weights)
        for window in range(recorded - 1):
            self._layout(window)


def dp_micro_batch_indices(iteration: int, *, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                           dp_size: int) -> list[range]:
    """Global positions of this DP rank's micro-batches in ``iteration`` (Megatron's sampler order).

    The global batch ``[it * GBS, (it + 1) * GBS)`` is cut into steps of ``micro_batch_size * dp_size``
    consecutive positions; rank r takes the r-th ``micro_batch_size`` slice of every step.
    """
    step = micro_batch_size * dp_size
    if global_batch_size % step:
        raise ValueError(f"--global-batch-size {global_batch_size} is not a multiple of --micro-batch-size "
                         f"{micro_batch_size} x data-parallel size {dp_size}")
    base = iteration * global_batch_size
    return [range(base + k + dp_rank * micro_batch_size, base + k + (dp_rank + 1) * micro_batch_size)
            for k in range(0, global_batch_size, step)]
