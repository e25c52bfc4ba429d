"""The every-K controller: per-domain validation -> domain discrepancy factor -> next window's weights.

Timeline (window j = iterations [jK, (j+1)K), laid out by ``DomainMixingSchedule``):

- start of a fresh run: evaluate teacher and student once; the teacher's perplexities are cached
  (it is frozen) and window 0 gets Eq. 1's weights (``ddk`` / ``no-smoothing``);
- after iteration jK (j >= 1): evaluate the student, apply Eq. 2 (or the ablation's rule) and fix
  window j's weights before any of its samples is read.

Signal (``--ddk-signal``): the paper computes the factor from the perplexity ratio
ppl_S / ppl_T = exp(ce_S - ce_T). ``kd-gap`` replaces the exponent ce_S - ce_T by the student's mean
per-token KD divergence from the teacher on the same validation samples (``KL(T || S)`` with the default
``--kd-loss-type``), so the ratio the equations see is exp(KD gap): a domain weighs more where the
student is furthest from the teacher's distributions, rather than where its data fit lags most. The
teacher then runs at every update (its outputs change nothing else).

The controller works on plain arrays (per-domain mean CE from the caller's evaluation) and holds
K (``interval``): the window of an iteration is ``window_of(iteration)``. It does not keep the
mixture: the sampler (``data.mixing.DomainMixingSchedule``) is the one owner of every window's
weights and checkpoints them; ``update`` receives r_t (the weights of the window that just ended)
and returns r_{t+1}. What it does keep (the teacher's CE, the student's first and last CE) lives in
``state_dict`` (JSON-able) so a resumed run continues with the same teacher numbers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from megatron_ddk.ddk import factor
from megatron_ddk.errors import CheckpointError


class DDKController:
    def __init__(
        self,
        *,
        mixing: str,
        alpha: float,
        interval: int,
        domain_names: Sequence[str],
        static_weights: Sequence[float],
        log_file: str | None,
        dynamic: bool,
        temperature: float = 1.0,
        max_step: float = 1.0,
        signal: str = "ppl-ratio",
    ):
        self.mixing = mixing
        self.signal = signal
        self.alpha = alpha
        self.temperature = temperature
        self.max_step = max_step
        self.interval = interval
        self.domain_names = list(domain_names)
        self.static_weights = np.asarray(static_weights, dtype=np.float64)
        self.log_file = log_file
        self.dynamic = dynamic
        """False for cpt/kd: weights stay static and the student is validated only at start and end."""
        self.ce_teacher: np.ndarray | None = None
        self.ce_student_initial: np.ndarray | None = None
        self.ce_student_last: np.ndarray | None = None
        self.last_record: dict[str, Any] | None = None

    # -------------------------------------------------------------------------------- decisions
    def initial_weights(self) -> np.ndarray:
        """Window 0's mixture before any evaluation: the registry's (static / ddk) or equal weights."""
        return factor.first_weights(
            self.mixing if self.dynamic else "static", self.static_weights, len(self.domain_names)
        )

    def window_of(self, iteration: int) -> int:
        """The window iteration ``iteration`` belongs to: window j is iterations [jK, (j+1)K)."""
        return iteration // self.interval

    def is_update_iteration(self, iteration: int, train_iters: int) -> bool:
        """Update after iteration jK, when window j will actually be trained on."""
        return self.dynamic and iteration > 0 and iteration % self.interval == 0 and iteration < train_iters

    def start(
        self,
        ce_student: np.ndarray,
        ce_teacher: np.ndarray | None,
        *,
        iteration: int = 0,
        kd_gap: np.ndarray | None = None,
    ) -> np.ndarray:
        """First evaluation of a fresh run: cache the teacher, compute window 0's weights (Eq. 1)."""
        self.ce_teacher = ce_teacher
        self.ce_student_initial = ce_student
        self.ce_student_last = ce_student
        weights = self.initial_weights()
        if self.dynamic and self.ce_teacher is not None:
            weights = self._weights(None, ce_student, kd_gap)
        self._log(self.record(iteration, 0, ce_student, weights, kd_gap))
        return weights

    def update(
        self, r_prev: np.ndarray, ce_student: np.ndarray, *, iteration: int, kd_gap: np.ndarray | None = None
    ) -> np.ndarray:
        """Eq. 2 at the start of window ``window_of(iteration)``: r_prev (r_t) -> r_{t+1}."""
        if self.ce_teacher is None:
            raise RuntimeError("DDK update before the teacher was evaluated; start() must run first")
        self.ce_student_last = ce_student
        weights = self._weights(r_prev, ce_student, kd_gap)
        self._log(self.record(iteration, self.window_of(iteration), ce_student, weights, kd_gap))
        return weights

    def _weights(
        self, r_prev: np.ndarray | None, ce_student: np.ndarray, kd_gap: np.ndarray | None
    ) -> np.ndarray:
        """Eq. 1 (``r_prev`` None) or Eq. 2 on the signal: exponent ce_S - ce_T, or the KD gap (ratio exp(gap))."""
        assert self.ce_teacher is not None
        if self.signal == "kd-gap":
            if kd_gap is None:
                raise RuntimeError("--ddk-signal kd-gap: the evaluation did not measure the KD gap")
            gap = np.maximum(
                np.asarray(kd_gap, dtype=np.float64), 0.0
            )  # a divergence; fp noise can dip below 0
            ce_student, ce_teacher = gap, np.zeros_like(gap)
        else:
            ce_teacher = self.ce_teacher
        return factor.next_weights(
            self.mixing,
            r_prev=r_prev,
            ce_student=ce_student,
            ce_teacher=ce_teacher,
            alpha=self.alpha,
            static_weights=self.static_weights,
            **self._variant,
        )

    @property
    def _variant(self) -> dict[str, float]:
        """The ``ddk-*`` modes' parameters (docs/DDK.md)."""
        return {"temperature": self.temperature, "max_step": self.max_step}

    def finish(self, ce_student: np.ndarray) -> None:
        self.ce_student_last = ce_student

    # ------------------------------------------------------------------------------- reporting
    def record(
        self,
        iteration: int,
        window: int,
        ce_student: np.ndarray,
        weights: np.ndarray,
        kd_gap: np.ndarray | None = None,
    ) -> dict[str, Any]:
        ce_teacher = self.ce_teacher
        ratio = None if ce_teacher is None else factor.perplexity_ratio(ce_student, ce_teacher)
        record = {
            "iteration": iteration,
            "window": window,
            "mixing": self.mixing if self.dynamic else "static",
            "domains": self.domain_names,
            "ce_student": _list(ce_student),
            "ce_teacher": _list(ce_teacher),
            "ppl_student": _list(np.exp(ce_student)),
            "ppl_teacher": _list(None if ce_teacher is None else np.exp(ce_teacher)),
            "ratio": _list(ratio),
            "weights": _list(weights),
        }
        if self.signal != "ppl-ratio":
            record.update(signal=self.signal, kd_gap=_list(kd_gap))
        return record

    def _log(self, record: dict[str, Any]) -> None:
        self.last_record = record
        if self.log_file is None:
            return
        Path(self.log_file).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "a") as handle:
            handle.write(json.dumps(self.last_record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def truncate_log(self, iteration: int) -> None:
        """On resume, drop log records newer than the checkpoint (they will be recomputed identically)."""
        if self.log_file is None or not os.path.exists(self.log_file):
            return
        # a record cut short by a kill (no closing brace) is dropped like the newer ones
        kept = [
            line
            for line in Path(self.log_file).read_text().splitlines()
            if line.strip().endswith("}") and json.loads(line)["iteration"] <= iteration
        ]
        tmp = self.log_file + ".tmp"
        Path(tmp).write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.log_file)

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "mixing": self.mixing,
            "signal": self.signal,
            "domains": self.domain_names,
            "ce_teacher": _list(self.ce_teacher),
            "ce_student_initial": _list(self.ce_student_initial),
            "ce_student_last": _list(self.ce_student_last),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict``; checkpoints of earlier versions also hold "weights", which the
        caller checks against the sampler's (``checkpointing.restore_training_state``)."""
        if state["domains"] != self.domain_names:
            raise CheckpointError(
                f"the checkpoint was trained on domains {state['domains']} but this run has "
                f"{self.domain_names}; use the same --domains registry to resume"
            )
        if state.get("signal", "ppl-ratio") != self.signal:
            raise CheckpointError(
                f"the checkpoint's DDK updates used --ddk-signal {state.get('signal', 'ppl-ratio')}, this run "
                f"--ddk-signal {self.signal}; resume with the same signal (or start a new run with --finetune)"
            )
        self.ce_teacher = _array(state["ce_teacher"])
        self.ce_student_initial = _array(state["ce_student_initial"])
        self.ce_student_last = _array(state["ce_student_last"])


def _list(values: ArrayLike | None) -> list[float] | None:
    return None if values is None else [float(v) for v in np.asarray(values)]


def _array(values: ArrayLike | None) -> np.ndarray | None:
    return None if values is None else np.asarray(values, dtype=np.float64)
