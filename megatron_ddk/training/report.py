"""Human-readable output: the Megatron-style iteration line, TensorBoard scalars, DDK update lines,
validation lines and the end-of-run per-domain table. Nothing here computes or communicates: the
Trainer passes the numbers in, already reduced.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np

from megatron_ddk.platform.distributed import is_rank_0


def print_rank_0(message: str) -> None:
    if is_rank_0():
        print(message, flush=True)


def ddk_update_lines(record: dict[str, Any], what: str) -> str:
    """One line per domain for a DDK evaluation/update record (the JSONL log has the same numbers)."""
    lines = [
        f" DDK {what} at iteration {record['iteration']} (window {record['window']}, mixing {record['mixing']}):"
    ]
    for i, name in enumerate(record["domains"]):
        part = f"   {name:>20s} | student ppl {record['ppl_student'][i]:10.3f}"
        if record["ppl_teacher"] is not None:
            part += f" | teacher ppl {record['ppl_teacher'][i]:10.3f} | ratio {record['ratio'][i]:7.3f}"
        if record.get("kd_gap") is not None:
            part += f" | kd gap {record['kd_gap'][i]:7.4f}"
        part += f" | weight {record['weights'][i]:.4f}"
        lines.append(part)
    return "\n".join(lines)


def iteration_line(
    *,
    iteration: int,
    train_iters: int,
    global_batch_size: int,
    elapsed_ms: float,
    tokens_per_second: float,
    lr: float,
    losses: dict[str, float],
    grad_norm: float | None,
) -> str:
    """Megatron's training log line (the format its users grep and plot)."""
    return (
        f" [{datetime.now().strftime('%Y-%m-%d %H:%M:%S')}] iteration {iteration:8d}/{train_iters:8d} |"
        f" consumed samples: {iteration * global_batch_size:12d} |"
        f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
        f" tokens/s: {tokens_per_second:.0f} | learning rate: {lr:.6E} |"
        f" global batch size: {global_batch_size:5d} |"
        + "".join(f" {k}: {v:.6E} |" for k, v in losses.items())
        + f" grad norm: {grad_norm if grad_norm is not None else float('nan'):.3f} |"
    )


def write_iteration_scalars(
    writer,
    iteration: int,
    *,
    lr: float,
    losses: dict[str, float],
    grad_norm: float | None,
    tokens_per_second: float,
    domain_losses: dict[str, float],
) -> None:
    """The iteration line's numbers plus the per-domain training CE, as TensorBoard scalars."""
    for key, value in losses.items():
        writer.add_scalar(key, value, iteration)
    writer.add_scalar("learning-rate", lr, iteration)
    if grad_norm is not None:
        writer.add_scalar("grad-norm", grad_norm, iteration)
    writer.add_scalar("tokens-per-second", tokens_per_second, iteration)
    for name, value in domain_losses.items():
        writer.add_scalar(f"train-lm-loss/{name}", value, iteration)
    writer.flush()


def write_ddk_scalars(writer, iteration: int, record: dict[str, Any]) -> None:
    """A DDK evaluation/update record (``DDKController.last_record``) as TensorBoard scalars."""
    for i, name in enumerate(record["domains"]):
        writer.add_scalar(f"ddk-weight/{name}", record["weights"][i], iteration)
        writer.add_scalar(f"ddk-ppl-student/{name}", record["ppl_student"][i], iteration)
        if record["ratio"] is not None:
            writer.add_scalar(f"ddk-ppl-ratio/{name}", record["ratio"][i], iteration)
            writer.add_scalar(f"ddk-ppl-teacher/{name}", record["ppl_teacher"][i], iteration)
    writer.flush()


def validation_line(
    iteration: int, names: Sequence[str], ce_student: np.ndarray, tokens: np.ndarray
) -> tuple[str, float]:
    """Megatron's validation line with a per-domain breakdown; also returns the token-weighted mean CE."""
    total = float(np.sum(ce_student * tokens) / np.sum(tokens))
    per_domain = " | ".join(f"{n}: {v:.4f}" for n, v in zip(names, ce_student))
    line = (
        f" validation loss at iteration {iteration} | lm loss value: {total:.6E} | "
        f"lm loss PPL: {np.exp(total):.6E} | {per_domain}"
    )
    return line, total


def result_table(controller, final_ce_student: np.ndarray, final_weights: np.ndarray) -> str:
    """Per domain: teacher ppl, student ppl before and after, ratio after, final weight."""
    names = controller.domain_names
    before = np.exp(controller.ce_student_initial) if controller.ce_student_initial is not None else None
    after = np.exp(final_ce_student)
    teacher = np.exp(controller.ce_teacher) if controller.ce_teacher is not None else None
    header = (
        f"{'domain':>20s} | {'teacher ppl':>11s} | {'student ppl before':>18s} | {'student ppl after':>17s} | "
        f"{'ratio S/T':>9s} | {'final weight':>12s}"
    )
    rule = "-" * len(header)
    rows = [rule, header, rule]
    for i, name in enumerate(names):
        t = f"{teacher[i]:11.3f}" if teacher is not None else f"{'-':>11s}"
        b = f"{before[i]:18.3f}" if before is not None else f"{'-':>18s}"
        r = f"{after[i] / teacher[i]:9.3f}" if teacher is not None else f"{'-':>9s}"
        rows.append(f"{name:>20s} | {t} | {b} | {after[i]:17.3f} | {r} | {final_weights[i]:12.4f}")
    rows.append(rule)
    return "\n".join(rows)
