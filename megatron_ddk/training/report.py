"""Human-readable output: rank-0 printing, DDK update lines and the end-of-run per-domain table."""

from __future__ import annotations

from typing import Any

import numpy as np

from megatron_ddk.platform.distributed import is_rank_0


def print_rank_0(message: str) -> None:
    if is_rank_0():
        print(message, flush=True)


def ddk_update_lines(record: dict[str, Any], what: str) -> str:
    """One line per domain for a DDK evaluation/update record (the JSONL log has the same numbers)."""
    lines = [f" DDK {what} at iteration {record['iteration']} (window {record['window']}, mixing {record['mixing']}):"]
    for i, name in enumerate(record["domains"]):
        part = f"   {name:>20s} | student ppl {record['ppl_student'][i]:10.3f}"
        if record["ppl_teacher"] is not None:
            part += f" | teacher ppl {record['ppl_teacher'][i]:10.3f} | ratio {record['ratio'][i]:7.3f}"
        part += f" | weight {record['weights'][i]:.4f}"
        lines.append(part)
    return "\n".join(lines)


def result_table(controller, final) -> str:
    """Per domain: teacher ppl, student ppl before and after, ratio after, final weight."""
    names = controller.domain_names
    before = np.exp(controller.ce_student_initial) if controller.ce_student_initial is not None else None
    after = final.ppl_student
    teacher = np.exp(controller.ce_teacher) if controller.ce_teacher is not None else None
    header = f"{'domain':>20s} | {'teacher ppl':>11s} | {'student ppl before':>18s} | {'student ppl after':>17s} | " \
             f"{'ratio S/T':>9s} | {'final weight':>12s}"
    rule = "-" * len(header)
    rows = [rule, header, rule]
    for i, name in enumerate(names):
        t = f"{teacher[i]:11.3f}" if teacher is not None else f"{'-':>11s}"
        b = f"{before[i]:18.3f}" if before is not None else f"{'-':>18s}"
        r = f"{after[i] / teacher[i]:9.3f}" if teacher is not None else f"{'-':>9s}"
        rows.append(f"{name:>20s} | {t} | {b} | {after[i]:17.3f} | {r} | {controller.weights[i]:12.4f}")
    rows.append(rule)
    return "\n".join(rows)
