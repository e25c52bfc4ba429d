"""megatron-ddk: DDK (Distilling Domain Knowledge, arXiv 2407.16154) on megatron-core."""

from importlib.metadata import PackageNotFoundError, version

__version__ = "0.1.0"

REQUIRED_MEGATRON_CORE = "0.16.1"


def _check_megatron_core_version() -> None:
    """megatron_ddk.platform.cpu_compat patches exact lines of one megatron-core release."""
    try:
        found = version("megatron-core")
    except PackageNotFoundError as exc:
        raise ImportError(
            f"megatron-core is not installed; install megatron-core=={REQUIRED_MEGATRON_CORE} "
            "(`make install` or `pip install -e .`)"
        ) from exc
    if found != REQUIRED_MEGATRON_CORE:
        raise ImportError(
            f"megatron-ddk needs megatron-core=={REQUIRED_MEGATRON_CORE}, found {found}; "
            f"run `pip install megatron-core=={REQUIRED_MEGATRON_CORE}`"
        )


_check_megatron_core_version()

# Without TE/apex megatron-core falls back to torch kernels and says so once per module; on CPU
# that is the intended path, so keep the logs readable.
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=r".*Apex is not installed.*")
