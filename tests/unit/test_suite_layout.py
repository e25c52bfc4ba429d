"""Guard for the suite itself: every test directory is collected by `make test`, except those listed.

pytest silently skips directories named like its default ``norecursedirs`` (``dist``, ``build``, ...);
the multi-process tests once lived in ``tests/dist`` and never ran.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers import REPO_ROOT, python

NOT_COLLECTED = {
    "scripts": "programs the tests launch (torchrun / python), not tests themselves",
    "soak": "kill_resume.py: minutes-long soak run by hand (docs/CHECKPOINTS.md); a 2-kill version is in integration",
}


def test_every_test_directory_is_collected():
    proc = python("-m", "pytest", "tests", "--collect-only", "-q", "-p", "no:cacheprovider")
    collected = {line.split("/")[1] for line in proc.stdout.splitlines() if line.startswith("tests/")}
    directories = {
        p.name
        for p in (REPO_ROOT / "tests").iterdir()
        if p.is_dir() and any(p.glob("*.py")) and p.name not in NOT_COLLECTED
    }
    assert directories and directories <= collected, (directories, collected)
    assert not collected & set(NOT_COLLECTED), collected  # deliberately out of the default suite
    assert (REPO_ROOT / "tests" / "soak" / "kill_resume.py").is_file()
    assert Path(REPO_ROOT / "tests" / "integration").is_dir()
