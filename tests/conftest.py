from __future__ import annotations

import pytest

from tests.corpus import build_tiny_corpus


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """Built once per session: the data every end-to-end test trains on."""
    return build_tiny_corpus(tmp_path_factory.mktemp("tiny_corpus"))
