"""One test per CPU-compatibility patch: the megatron-core call it fixes now works on CPU."""

from __future__ import annotations

import pytest

from megatron_ddk.platform.cpu_compat import PATCHES
from tests.helpers import SCRIPTS, python, read_json


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("compat") / "results.json"
    python(SCRIPTS / "cpu_compat_checks.py", out)
    return read_json(out)


def test_every_patch_has_a_check(results):
    assert sorted(PATCHES) == results["_patches"]
    assert set(PATCHES) <= set(results) - {"_patches"}


@pytest.mark.parametrize("patch", sorted(PATCHES))
def test_patch_makes_megatron_call_work(results, patch):
    assert results[patch] == "ok", results[patch]


def test_noop_when_cuda_is_present_and_idempotent():
    code = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "from megatron_ddk.platform.cpu_compat import apply_cpu_compat\n"
        "assert apply_cpu_compat() == [], 'nothing may be patched on a GPU host'\n"
        "import megatron.core.pipeline_parallel.schedules as s; assert s.torch is torch\n"
        "torch.cuda.is_available = lambda: False\n"
        "first = apply_cpu_compat(); assert first and apply_cpu_compat() == first\n"
        "print('ok')\n"
    )
    assert python("-c", code).stdout.strip().endswith("ok")


def test_other_megatron_core_version_is_refused_at_startup_not_at_import():
    code = (
        "import importlib.metadata as md; real = md.version\n"
        "md.version = lambda name: '0.17.0' if name == 'megatron-core' else real(name)\n"
        "import megatron_ddk.training.trainer\n"  # importing has no side effects
        "print('imported', flush=True)\n"
        "from megatron_ddk.platform.startup import prepare_process\n"
        "prepare_process()\n"
    )
    proc = python("-c", code, check=False)
    assert proc.stdout.strip() == "imported"
    assert proc.returncode != 0 and "needs megatron-core==0.16.1, found 0.17.0" in proc.stderr
