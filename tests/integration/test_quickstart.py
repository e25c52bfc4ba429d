"""The README's main command, shrunk: examples/quickstart/run_cpu.sh end to end with a few iterations."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, subprocess_env

pytestmark = pytest.mark.slow


def test_quickstart_script_runs_end_to_end(tmp_path):
    env = subprocess_env(
        {
            "PYTHON": sys.executable,
            "OUT": str(tmp_path / "qs"),
            "SIZE_MB": "0.5",
            "TEACHER_ITERS": "4",
            "STUDENT_PRETRAIN_ITERS": "2",
            "STUDENT_ITERS": "4",
            "DDK_INTERVAL": "2",
            "VAL_SAMPLES": "8",
            "WARMUP": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    proc = subprocess.run(
        ["bash", "examples/quickstart/run_cpu.sh"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "teacher ppl | student ppl before | student ppl after | ratio S/T | final weight" in out
    assert "DDK update at iteration 2 (window 1, mixing ddk-log)" in out
    # the last table: DDK and KD students side by side on the test split
    header = next(line for line in out.splitlines() if "student_kd S/T" in line)
    assert [c.strip() for c in header.split("|")] == [
        "domain",
        "teacher ppl",
        "student ppl",
        "student_kd ppl",
        "student S/T",
        "student_kd S/T",
    ]
    assert out.rstrip().splitlines()[-1].startswith("done:")
    result = json.loads((tmp_path / "qs" / "test_eval.json").read_text())
    assert result["split"] == "test" and [s["student"].split("/")[-1] for s in result["students"]] == [
        "student",
        "student_kd",
    ]
    for name in ("python_code", "prose", "arithmetic", "records"):
        assert name in out
    assert os.path.getsize(tmp_path / "qs" / "ddk.png") > 10_000
    assert (tmp_path / "qs" / "student" / "ddk_log.jsonl").read_text().count("\n") == 2  # iterations 0 and 2
