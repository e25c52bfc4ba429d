"""One Markdown table from several ``benchmarks/ddk_ablation.py`` outputs: each method's seed-paired gain over
``kd-equal`` on the worst-domain and the average test ratio, one column per study (docs/DDK.md).

    python benchmarks/ddk_study_table.py "near, short=ddk_study/ablation_near" "far, short=ddk_study/ablation_far" ...

A cell reads ``worst / average``: mean difference to ``kd-equal`` +- its standard error over the seeds (negative:
better than KD on equal sampling); ``.`` where a study did not run the method. Rows keep the first study's order,
then the methods only later studies ran.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "."
    (worst, worst_se), (mean, mean_se) = entry["diff_worst"], entry["diff_mean"]
    return f"{worst:+.3f} ± {worst_se:.3f} / {mean:+.3f} ± {mean_se:.3f}"


def table(studies: list[tuple[str, dict]]) -> str:
    methods: list[str] = []
    for _, summary in studies:
        methods += [m for m in summary["methods"] if m not in methods and m != summary["reference"]]
    lines = [
        "| method | " + " | ".join(name for name, _ in studies) + " |",
        "|---|" + "---|" * len(studies),
    ]
    for method in methods:
        cells = [_cell(summary["methods"].get(method)) for _, summary in studies]
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "studies", nargs="+", metavar="NAME=DIR", help="column name and ddk_ablation --output-dir"
    )
    args = parser.parse_args(argv)
    studies = []
    for item in args.studies:
        name, sep, directory = item.partition("=")
        path = Path(directory) / "summary.json"
        if not sep or not path.is_file():
            print(
                f"ddk_study_table.py: error: {item!r} is not NAME=DIR with DIR/summary.json", file=sys.stderr
            )
            return 2
        studies.append((name, json.loads(path.read_text())))
    print(table(studies))
    return 0


if __name__ == "__main__":
    sys.exit(main())
