"""What a process does once before it builds anything: explicit calls, never import side effects.

``prepare_process()`` is called by ``pretrain_ddk.py`` and the tools that build models: it checks the
pinned megatron-core release (``cpu_compat`` patches exact lines of it), quiets the fallback warnings
megatron-core prints when Transformer Engine and apex are absent (the intended path on CPU), and
applies the CPU compatibility layer when CUDA is absent. Importing ``megatron_ddk`` does none of it.
"""

from __future__ import annotations

import warnings
from importlib.metadata import PackageNotFoundError, version

from megatron_ddk.errors import ConfigError

REQUIRED_MEGATRON_CORE = "0.16.1"


def check_megatron_core_version() -> None:
    """Fail with a one-line ConfigError unless the pinned megatron-core release is installed."""
    try:
        found = version("megatron-core")
    except PackageNotFoundError as exc:
        raise ConfigError(
            f"megatron-core is not installed; install megatron-core=={REQUIRED_MEGATRON_CORE} "
            "(`make install` or `pip install -e .`)"
        ) from exc
    if found != REQUIRED_MEGATRON_CORE:
        raise ConfigError(
            f"megatron-ddk needs megatron-core=={REQUIRED_MEGATRON_CORE}, found {found}; "
            f"run `pip install megatron-core=={REQUIRED_MEGATRON_CORE}`"
        )


def quiet_fallback_warnings() -> None:
    """Without TE/apex megatron-core falls back to torch kernels and says so once per module."""
    warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=r".*Apex is not installed.*")


def prepare_process() -> None:
    """Version check, warning filters and (without CUDA) the CPU compatibility patches, in that order."""
    check_megatron_core_version()
    quiet_fallback_warnings()
    from megatron_ddk.platform.cpu_compat import apply_cpu_compat

    apply_cpu_compat()
