"""Time a save blocks training, synchronous vs ``--async-save``, on the quickstart teacher's saves.

    python benchmarks/async_save.py                       # 2 rounds of 8 saves each way (CPU)
    python benchmarks/async_save.py --rounds 3 --saves 12 --work /tmp/bench

Trains the quickstart teacher (the model and data of benchmarks/checkpoint_manifest.py) with a save
after every iteration, alternately without and with ``--async-save``, and reads each save's log line:
``successfully saved ... [ s, manifest s ]`` (sync) and ``scheduled an async checkpoint save ... [ s ]``
(async) give the seconds the save blocked training. Also the median iteration time as logged (it
includes the save that preceded it and, with ``--async-save``, the writer competing for the cores)
and how long after scheduling each background save was published.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint_manifest import TEACHER, prepare  # noqa: E402
from ddk_overhead import ROOT, sh  # noqa: E402

BLOCKED = {
    "sync": re.compile(r"successfully saved checkpoint at iteration\s+\d+ .*\[ ([0-9.]+)s, manifest"),
    "async": re.compile(r"scheduled an async checkpoint save at iteration\s+\d+ .*\[ ([0-9.]+)s \]"),
}
PUBLISHED = re.compile(
    r"published async checkpoint at iteration\s+\d+ .*\[ ([0-9.]+)s after it was scheduled"
)
ITERATION_MS = re.compile(r"elapsed time per iteration \(ms\): ([0-9.]+)")


def run(data: list[str], work: Path, saves: int, mode: str) -> dict[str, list[float]]:
    out = sh(
        "pretrain_ddk.py",
        *TEACHER,
        *data,
        "--train-iters",
        str(saves),
        "--save",
        str(work / f"ckpt_{mode}"),
        "--save-interval",
        "1",
        *(["--async-save"] if mode == "async" else []),
        cwd=ROOT,
    )
    return {
        "blocked": [float(s) for s in BLOCKED[mode].findall(out)],
        "published": [float(s) for s in PUBLISHED.findall(out)],
        "iteration_ms": [float(s) for s in ITERATION_MS.findall(out)][1:],  # the first has no save before it
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--saves", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_async_save_"))
    data = prepare(work)
    found: dict[str, dict[str, list[float]]] = {
        mode: {"blocked": [], "published": [], "iteration_ms": []} for mode in ("sync", "async")
    }
    for _ in range(args.rounds):  # alternated, so that both see the same machine
        for mode in ("sync", "async"):
            for key, values in run(data, work, args.saves, mode).items():
                found[mode][key] += values
    median = {
        mode: {k: statistics.median(v) if v else 0.0 for k, v in d.items()} for mode, d in found.items()
    }
    print(f"{args.rounds} rounds x {args.saves} saves each way (quickstart teacher, save every iteration)")
    print(f"{'':>6} {'blocked s (median)':>19} {'iteration ms (median)':>22}")
    for mode in ("sync", "async"):
        print(f"{mode:>6} {median[mode]['blocked']:19.3f} {median[mode]['iteration_ms']:22.1f}")
    print(
        f"async / sync: blocked {median['async']['blocked'] / median['sync']['blocked']:.2f}x, "
        f"iteration {median['async']['iteration_ms'] / median['sync']['iteration_ms']:.2f}x; "
        f"background saves published {median['async']['published']:.2f}s (median) after scheduling"
    )


if __name__ == "__main__":
    main()
