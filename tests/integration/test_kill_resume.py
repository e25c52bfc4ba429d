"""Two SIGKILLs at seeded random moments of a DDK run, each resumed: the trajectory (losses, sample ids,
DDK weights) equals the uninterrupted run's. The 10-kill soak: tests/soak/kill_resume.py (docs/CHECKPOINTS.md)."""

from __future__ import annotations

import pytest

from tests.integration.test_distillation import teacher  # noqa: F401  (session fixture)
from tests.soak.kill_resume import soak

pytestmark = pytest.mark.slow


def test_two_kills_resume_to_the_uninterrupted_trajectory(tiny_corpus, teacher, tmp_path):  # noqa: F811
    kills, differences = soak(tiny_corpus, teacher, tmp_path, kills=2, seed=1, iters=6)
    assert len(kills) == 2, kills
    assert differences == [], differences
