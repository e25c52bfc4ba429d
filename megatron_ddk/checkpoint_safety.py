"""Reading a checkpoint without running code from it.

A checkpoint may come from someone else (a downloaded teacher), so nothing in it may execute. The
files of a dist checkpoint and how each is parsed here:

- ``.metadata`` (torch.distributed.checkpoint's index, a pickle): a restricted unpickler that admits
  only the classes that index is made of (``ALLOWED_METADATA_GLOBALS``) and torch dtypes; any other
  class is refused with ``CheckpointError`` naming the file and the class.
- ``__<rank>_<n>.distcp`` (shards): tensors are read with ``torch.load(weights_only=True)`` by torch
  itself; stored objects (``_extra_state``, the distributed optimizer's per-group state, RNG state of
  checkpoints from before format 2) with ``torch.load(weights_only=True)`` by ``SafeLoadPlanner``
  (torch's default planner uses ``weights_only=False``).
- ``common.pt``: ``torch.load(weights_only=True)`` (``SafeCommonLoadStrategy``).
- ``metadata.json``, ``ddk_checkpoint.json``, ``ddk_manifest.json``, the tracker: JSON / text.

``SafeTorchDistLoadStrategy`` routes megatron-core's loader through the safe reader and planner;
every load in this project passes it (``megatron_ddk.checkpointing``).
"""

from __future__ import annotations

import contextlib
import io
import pickle
from functools import partial
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from megatron_ddk.errors import CheckpointError

DCP_METADATA_FILENAME = ".metadata"

# What torch.distributed.checkpoint's ``Metadata`` is built from (torch 2.x, as written by torch's and
# megatron-core's writers); found by disassembling real ``.metadata`` files (pickletools.genops).
ALLOWED_METADATA_GLOBALS = frozenset(
    {
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        ("torch.distributed.checkpoint.planner", name)
        for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")
    }
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # torch.strided & co. pickle as _get_layout("torch.strided")
        ("collections", "OrderedDict"),
    }
)


class _MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals are limited to ``ALLOWED_METADATA_GLOBALS`` and torch dtypes."""

    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise CheckpointError(
            f"{self.source} refers to {module}.{name}, which is not part of a torch.distributed.checkpoint index; "
            "refusing to load it (it could run code): use a checkpoint from a source you trust"
        )

    def persistent_load(self, pid):
        raise CheckpointError(
            f"{self.source} holds a persistent reference ({pid!r}), which a checkpoint index "
            "never does; refusing to load it"
        )


def read_dcp_metadata(checkpoint_dir: str | Path) -> Metadata:
    """The ``.metadata`` index of a dist checkpoint, unpickled with the restricted unpickler."""
    path = Path(checkpoint_dir) / DCP_METADATA_FILENAME
    try:
        with open(path, "rb") as handle:
            metadata = _MetadataUnpickler(handle, path).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {path.parent} is not a complete dist checkpoint") from None
    except CheckpointError:
        raise
    except Exception as err:  # truncated or garbled bytes surface as many exception types
        raise CheckpointError(
            f"{path} cannot be read ({type(err).__name__}: {err}); the checkpoint is damaged"
        ) from err
    if not isinstance(metadata, Metadata):
        raise CheckpointError(
            f"{path} holds a {type(metadata).__name__}, not a checkpoint index; it is damaged"
        )
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """torch's file reader serving an index already read by ``read_dcp_metadata``.

    (Its ``read_metadata`` takes no ``rank``: torch then never falls back to per-rank index files.)"""

    def __init__(self, path: str | Path, metadata: Metadata):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self) -> Metadata:
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class SafeLoadPlanner(mcore_torch.MCoreLoadPlanner):
    """megatron-core's load planner, with stored objects unpickled by ``torch.load(weights_only=True)``."""

    def __init__(self, *args, checkpoint_dir: str | Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.checkpoint_dir = checkpoint_dir

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(
                f"{self.checkpoint_dir}: stored object {fqn!r} is not plain data "
                f"({_weights_only_reason(err)}); refusing to load it (it could run code)"
            ) from err
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


@contextlib.contextmanager
def _safe_reading(checkpoint_dir):
    """Route megatron-core's torch_dist loader (it builds its reader and planner itself) through the safe
    reader and planner for the duration of one call; the only place that swaps megatron-core names.
    The index is read first, here, so that a refusal is raised as is (not inside torch's collectives)."""
    metadata = read_dcp_metadata(checkpoint_dir)
    saved = mcore_torch._get_filesystem_reader, mcore_torch.MCoreLoadPlanner
    mcore_torch._get_filesystem_reader = lambda path, cache_metadata=False: SafeFileSystemReader(
        path, metadata
    )
    mcore_torch.MCoreLoadPlanner = partial(SafeLoadPlanner, checkpoint_dir=checkpoint_dir)
    try:
        yield
    finally:
        mcore_torch._get_filesystem_reader, mcore_torch.MCoreLoadPlanner = saved


class SafeTorchDistLoadStrategy(mcore_torch.TorchDistLoadShardedStrategy):
    """megatron-core's torch_dist load strategy reading only through ``SafeFileSystemReader`` and
    ``SafeLoadPlanner``; pass it to ``dist_checkpointing.load`` / ``load_tensors_metadata``."""

    def load(self, sharded_state_dict, checkpoint_dir):
        with _safe_reading(checkpoint_dir):
            return super().load(sharded_state_dict, checkpoint_dir)

    def load_tensors_metadata(self, checkpoint_dir, metadata: Metadata | None = None):
        return super().load_tensors_metadata(checkpoint_dir, metadata or read_dcp_metadata(checkpoint_dir))

    def load_sharded_metadata(self, checkpoint_dir):
        with _safe_reading(checkpoint_dir):
            return super().load_sharded_metadata(checkpoint_dir)


class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """``common.pt`` with ``torch.load(weights_only=True)`` stated explicitly (not left to torch's default)."""

    def load_common(self, checkpoint_dir):
        path = Path(checkpoint_dir) / COMMON_STATE_FNAME
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(
                f"{path} is missing: {path.parent} is not a complete dist checkpoint"
            ) from None
        except Exception as err:
            raise CheckpointError(
                f"{path} cannot be loaded as plain data ({_weights_only_reason(err)}); refusing it "
                "(it could run code or is damaged)"
            ) from err

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir}: stored objects must be read by the torch_dist strategy")


def _weights_only_reason(err: Exception) -> str:
    """The line of torch's long ``weights_only`` message that names what was refused."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = next(
        (line for line in lines if "Unsupported global" in line or "Unsupported operand" in line), None
    )
    reason = named.split(". Please")[0] if named else (lines[0] if lines else type(err).__name__)
    return reason[:300]  # (torch goes on to suggest allow-listing the global: not advice to pass on)
