"""Per-file checksums of a checkpoint: written before it is published, checked before weights are read.

``ddk_manifest.json`` in each ``iter_*`` directory lists every other file with its size and checksum.
It catches rot, truncation, missing shards and files edited after the save; it is not a signature
(anyone who can edit the files can rewrite it), which is why loading also never runs code from a file
(``megatron_ddk.checkpoint_safety``). A checkpoint without a manifest (written before this existed)
loads with a warning.

The checksum is XXH3-128 (the ``xxhash`` package: ~10 GB/s per core, 4-6x zlib's CRC-32 here) over a
memory map of the file (no copy), rather than a cryptographic hash: it only has to notice accidents,
and it must cost little next to the save (``benchmarks/checkpoint_manifest.py``).
"""

from __future__ import annotations

import json
import mmap
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash

from megatron_ddk.errors import CheckpointError

MANIFEST_FILENAME = "ddk_manifest.json"
MANIFEST_FORMAT = 1
ALGORITHM = "xxh3_128"


def file_checksum(path: Path) -> str:
    """XXH3-128 of the file's bytes, as 32 hex digits (hashed from a read-only memory map)."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size:  # an empty file cannot be mapped
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                digest.update(mapped)
    return digest.hexdigest()


def describe(directory: Path, names: Iterable[str]) -> dict[str, dict[str, int | str]]:
    """``{name: {"size", "xxh3_128"}}`` of the given files of ``directory``; files are hashed in
    parallel threads (xxhash releases the GIL on large buffers)."""
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
