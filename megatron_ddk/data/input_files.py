"""``--input`` of the data tools: paths or glob patterns -> the files they name."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence


def expand_input_files(patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """(files, patterns that matched no file): a path as given, a glob's matches sorted; each file once."""
    files: list[str] = []
    missing: list[str] = []
    for pattern in map(str, patterns):
        matches = (
            [pattern]
            if os.path.isfile(pattern)
            else sorted(m for m in glob.glob(pattern) if os.path.isfile(m))
        )
        if not matches:
            missing.append(pattern)
        files.extend(m for m in matches if m not in files)
    return files, missing
