"""Stop on a non-finite loss or gradient norm (``--check-for-nan-in-loss-and-grad``, Megatron's flag).

megatron-core's own check (DDP ``check_for_nan_in_grad`` through its rerun state machine) asks for a
CUDA device while formatting its message, so on CPU it crashes instead of reporting, and it cannot
say which loss or which domain went wrong. This check reads the iteration's reduced reports, which
are identical on every rank (``metrics.reduce_reports``), so every rank stops at the same iteration
with the same one-line message and without an extra collective; the training loop raises before
saving, so the last good checkpoint stays the newest.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from megatron_ddk.errors import UserError
from megatron_ddk.training.evaluation import DomainEvaluation
from megatron_ddk.training.step import DOMAIN_LM_LOSS, KD_LOSS, LM_LOSS, TEACHER_LM_LOSS


class NonFiniteError(UserError):
    """A loss, a gradient norm or the teacher's logits are NaN or infinite."""


def training_problem(
    totals: dict[str, torch.Tensor],
    grad_norm,
    *,
    iteration: int,
    domain_names: list[str],
    teacher: str | None,
) -> str | None:
    """What is non-finite in one iteration's reduced reports and gradient norm, as one line (or None).

    ``totals`` holds ``[sum, count]`` pairs and, under ``DOMAIN_LM_LOSS``, ``[sums (N) | counts (N)]``."""
    teacher_bad = teacher is not None and not torch.isfinite(totals[TEACHER_LM_LOSS][0])
    bad = ["teacher lm loss"] if teacher_bad else []
    bad += [key for key in (LM_LOSS, KD_LOSS) if not torch.isfinite(totals[key][0])]
    if grad_norm is not None and not math.isfinite(float(grad_norm)):
        bad.append("grad norm")
    if not bad:
        return None
    n = len(domain_names)
    domains = [
        name for name, value in zip(domain_names, totals[DOMAIN_LM_LOSS][:n]) if not torch.isfinite(value)
    ]
    where = f" on domain(s) {', '.join(domains)}" if domains and len(domains) < n else ""
    return f"iteration {iteration}: non-finite {', '.join(bad)}{where}; {_advice(teacher if teacher_bad else None)}"


def evaluation_problem(
    evaluation: DomainEvaluation, *, iteration: int, domain_names: list[str], teacher: str | None
) -> str | None:
    """Non-finite per-domain validation losses (DDK's evaluation), as one line (or None)."""
    for who, ce in (("teacher", evaluation.ce_teacher), ("student", evaluation.ce_student)):
        if ce is not None and not np.all(np.isfinite(ce)):
            domains = [name for name, value in zip(domain_names, ce) if not np.isfinite(value)]
            return (
                f"iteration {iteration}: non-finite {who} validation loss on domain(s) {', '.join(domains)}; "
                f"{_advice(teacher if who == 'teacher' else None)}"
            )
    return None


def _advice(bad_teacher: str | None) -> str:
    stopped = "stopped without saving (the newest checkpoint is from before it)"
    if bad_teacher is not None:
        return (
            f"the teacher --teacher-load {bad_teacher} produces non-finite logits (a bad conversion, NaN "
            f"weights or an FP8 overflow: check it, try --teacher-fp8 false); {stopped}"
        )
    return f"{stopped}: lower --lr or raise --lr-warmup-iters, check --clip-grad and the data"


def raise_if(problem: str | None) -> None:
    if problem is not None:
        raise NonFiniteError(problem)
