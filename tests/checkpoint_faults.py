"""Damage and hostile payloads for checkpoint tests: each helper edits a copy of a checkpoint in place.

A payload is a pickle that, if unpickled without restriction, creates ``marker`` (the tests assert it
never exists). ``rewrite_manifest`` plays the attacker who also updates the checksums, so that the
parsers themselves are what is tested.
"""

from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path

import torch

from megatron_ddk.checkpoint_manifest import MANIFEST_FILENAME, describe, write_manifest


class Payload:
    """Unpickling this runs ``exec``: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


class StealthPayload:
    """Runs the payload and then yields the real object, so a load would otherwise look normal."""

    def __init__(self, marker: Path, real):
        self.marker, self.real = str(marker), real

    def __reduce__(self):
        return _stealth, (Payload(Path(self.marker)), self.real)


def _stealth(_ran, real):
    return real


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of the ``iter_*`` directory ``src`` under ``dst`` (a root with a tracker)."""
    shutil.copytree(src, dst / src.name)
    (dst / "latest_checkpointed_iteration.txt").write_text(f"{int(src.name.split('_')[1])}\n")
    return dst / src.name


def rewrite_manifest(directory: Path) -> None:
    """Recompute every checksum (what an attacker who edits files would do)."""
    (directory / MANIFEST_FILENAME).unlink(missing_ok=True)
    write_manifest(directory, describe(directory, []))


def plant_in_metadata(directory: Path, marker: Path, *, stealth: bool = False) -> None:
    """Replace ``.metadata`` with a payload (stealth: one that returns the real index afterwards)."""
    path = directory / ".metadata"
    real = pickle.loads(path.read_bytes())
    path.write_bytes(pickle.dumps(StealthPayload(marker, real) if stealth else Payload(marker)))


def plant_in_common(directory: Path, marker: Path) -> None:
    path = directory / "common.pt"
    real = torch.load(path, weights_only=True)
    torch.save({**real, "iteration": Payload(marker)}, path)


def plant_in_shard(directory: Path, marker: Path) -> str:
    """Overwrite a stored object (a layer's ``_extra_state``, read on every load) inside its shard file
    with a legacy-format ``torch.save`` of the payload; returns the shard's file name."""
    from megatron_ddk.checkpoint_safety import read_dcp_metadata

    metadata = read_dcp_metadata(directory)
    index = next(i for i, info in metadata.storage_data.items() if "_extra_state" in i.fqn)
    info = metadata.storage_data[index]
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer, _use_new_zipfile_serialization=False)
    payload = buffer.getvalue()
    assert len(payload) <= info.length, (len(payload), info.length)
    with open(directory / info.relative_path, "r+b") as handle:
        handle.seek(info.offset)
        handle.write(payload + b"\0" * (info.length - len(payload)))
    return info.relative_path


def plant_in_json(directory: Path, name: str, marker: Path) -> None:
    (directory / name).write_bytes(pickle.dumps(Payload(marker)))


def flip_bytes(path: Path, *, at: float = 0.5, count: int = 4) -> None:
    """Invert ``count`` bytes in the middle of the file (same size: only a checksum notices)."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
