"""Plot a DDK run: domain weights and student/teacher perplexity ratios over iterations.

    python tools/plot_ddk.py RUN/ddk_log.jsonl --output ddk.png

Reads the JSONL log pretrain_ddk.py writes at every DDK evaluation (one record per update, see
docs/DDK.md) and draws two panels: the mixture weight of each domain (steps: a weight holds for its
whole window) and the ratio ppl_S / ppl_T per domain (log scale; 1 means the student caught up).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import _bootstrap  # noqa: F401

from megatron_ddk.errors import DataError, UserError

REQUIRED = ("iteration", "domains", "weights", "ratio")


class LogError(DataError):
    pass


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        raise LogError(f"{path}: no such file; DDK logs are written to <--save>/ddk_log.jsonl")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise LogError(f"{path}:{number}: not JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise LogError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        missing = [k for k in REQUIRED if k not in record]
        if missing:
            raise LogError(f"{path}:{number}: record lacks {', '.join(missing)}; is this a ddk_log.jsonl?")
        _check_record(record, records[0]["domains"] if records else None, f"{path}:{number}")
        records.append(record)
    if not records:
        raise LogError(f"{path}: empty log; the run has not reached its first DDK evaluation")
    return records


def _check_record(record: dict, domains: list | None, where: str) -> None:
    names = record["domains"]
    if not isinstance(names, list) or not names:
        raise LogError(f"{where}: 'domains' must be a non-empty list of names")
    if domains is not None and names != domains:
        raise LogError(f"{where}: domains {names} differ from the first record's {domains}; one log per run")
    if not isinstance(record["iteration"], int):
        raise LogError(f"{where}: 'iteration' must be an integer, got {record['iteration']!r}")
    for key in ("weights", "ratio"):
        values = record[key]
        if key == "ratio" and values is None:  # runs without a teacher have no ratio
            continue
        if (
            not isinstance(values, list)
            or len(values) != len(names)
            or not all(isinstance(v, (int, float)) for v in values)
        ):
            raise LogError(f"{where}: '{key}' must be {len(names)} numbers (one per domain), got {values!r}")


def plot(records: list[dict], output: Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    domains = records[0]["domains"]
    iterations = [r["iteration"] for r in records]
    has_ratio = all(r["ratio"] is not None for r in records)
    fig, axes = plt.subplots(
        2 if has_ratio else 1, 1, figsize=(9, 7 if has_ratio else 4), sharex=True, squeeze=False
    )
    weights_ax = axes[0][0]
    for i, name in enumerate(domains):
        weights_ax.step(
            iterations, [r["weights"][i] for r in records], where="post", label=name, marker="o", ms=3
        )
    weights_ax.set_ylabel("domain weight")
    weights_ax.set_title(title or f"DDK domain mixture ({records[0].get('mixing', 'ddk')})")
    weights_ax.legend(loc="best", fontsize="small")
    weights_ax.grid(alpha=0.3)
    if has_ratio:
        ratio_ax = axes[1][0]
        for i, name in enumerate(domains):
            ratio_ax.plot(iterations, [r["ratio"][i] for r in records], label=name, marker="o", ms=3)
        ratio_ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ratio_ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")  # "1.5", not "1.5 x 10^0"
        ratio_ax.yaxis.set_major_formatter(plain)
        ratio_ax.yaxis.set_minor_formatter(plain)
        ratio_ax.set_ylabel("ppl student / ppl teacher")
        ratio_ax.grid(alpha=0.3, which="both")
    axes[-1][0].set_xlabel("iteration")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.stem + ".tmp" + output.suffix)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, output)  # an existing plot is replaced whole or not at all
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("log", help="ddk_log.jsonl of a run")
    parser.add_argument("--output", default="ddk.png")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        records = read_log(Path(args.log))
    except UserError as err:
        print(f"plot_ddk.py: error: {err}", file=sys.stderr)
        return 2
    plot(records, Path(args.output), args.title)
    print(f"wrote {args.output} ({len(records)} updates, {len(records[0]['domains'])} domains)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
