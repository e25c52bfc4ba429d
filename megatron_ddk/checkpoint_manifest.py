"""Per-file checksums of a checkpoint: written before it is published, checked before weights are read.

``ddk_manifest.json`` in each ``iter_*`` directory lists every other file with its size and checksum.
It catches rot, truncation, missing shards and files edited after the save; it is not a signature
(anyone who can edit the files can rewrite it), which is why loading also never runs code from a file
(``megatron_ddk.checkpoint_safety``). A checkpoint without a manifest (written before this existed)
loads with a warning.

The checksum is CRC-32 (``zlib.crc32``, about as fast as writing the bytes) rather than a
cryptographic hash: it only has to notice accidents, and it must cost little next to the save.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megatron_ddk.errors import CheckpointError

MANIFEST_FILENAME = "ddk_manifest.json"
MANIFEST_FORMAT = 1
ALGORITHM = "crc32"
_CHUNK = 8 << 20


def file_checksum(path: Path) -> str:
    """``zlib.crc32`` of the file's bytes, as 8 hex digits."""
    value = 0
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        while True:
            n = handle.readinto(buffer)
            if not n:
                break
            value = zlib.crc32(view[:n], value)
    return f"{value:08x}"


def describe(directory: Path, names: Iterable[str]) -> dict[str, dict[str, int | str]]:
    """``{name: {"size", "crc32"}}`` of the given files of ``directory``; files are read in parallel
    threads (zlib releases the GIL while it checksums)."""
    names = list(names)
    with ThreadPoolExecutor(max_workers=max(1, min(len(names), os.cpu_count() or 1, 8))) as pool:
        sums = list(pool.map(file_checksum, [directory / name for name in names]))
    return {
        name: {"size": (directory / name).stat().st_size, ALGORITHM: crc} for name, crc in zip(names, sums)
    }


def own_shard_files(directory: Path, rank: int) -> list[str]:
    """The shard files a rank wrote (``__<rank>_<n>.distcp``): each rank checksums its own."""
    pattern = re.compile(rf"__{rank}_\d+\.distcp$")
    return sorted(p.name for p in directory.iterdir() if pattern.match(p.name))


def write_manifest(directory: Path, entries: dict[str, dict]) -> None:
    """Complete ``entries`` with every file not yet described, then write the manifest (rank 0)."""
    missing = sorted(
        p.name
        for p in directory.iterdir()
        if p.is_file() and p.name != MANIFEST_FILENAME and p.name not in entries
    )
    files = {**entries, **describe(directory, missing)}
    body = {"format": MANIFEST_FORMAT, "algorithm": ALGORITHM, "files": dict(sorted(files.items()))}
    tmp = directory / (MANIFEST_FILENAME + ".tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, directory / MANIFEST_FILENAME)


def read_manifest(directory: Path) -> dict[str, dict] | None:
    """The manifest's file table, or None for a checkpoint written before manifests existed."""
    path = directory / MANIFEST_FILENAME
    if not path.exists():
        return None
    try:
        body = json.loads(path.read_text())
        files = body["files"]
        if (
            body.get("format") != MANIFEST_FORMAT
            or body.get("algorithm") != ALGORITHM
            or not isinstance(files, dict)
        ):
            raise ValueError(f"format {body.get('format')!r}, algorithm {body.get('algorithm')!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path} is not a readable manifest ({err}); the checkpoint is damaged"
        ) from err
    return files


def find_problem(directory: Path, *, full: bool = True, part: int = 0, parts: int = 1) -> str | None:
    """The first problem with the files of ``directory`` as one phrase, or None when they match.

    ``full=False`` checks presence and sizes only (cheap: before any process group exists);
    ``part``/``parts`` checksum every ``parts``-th file so that ranks share the reading."""
    files = read_manifest(directory)
    if files is None:
        return None
    for i, (name, entry) in enumerate(sorted(files.items())):
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{path} has {size} bytes but {entry['size']} were saved (truncated or overwritten)"
        if full and i % parts == part and file_checksum(path) != entry[ALGORITHM]:
            return f"{path} does not match its checksum in {MANIFEST_FILENAME} (the bytes changed after the save)"
    return None
