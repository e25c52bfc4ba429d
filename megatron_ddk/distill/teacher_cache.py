"""The teacher cache: the teacher's top-k per token, keyed by (domain, split, domain-local sample id).

The mixing sampler names every training row by its domain and its GPTDataset sample id
(``data/mixing.py``), so a cache keyed that way serves any mixture, window layout, DP layout and
resume; DDK's validation reads the teacher's per-sample CE from it. Written by
``tools/cache_teacher_logits.py``, read by the trainer (``distill/teacher_source.py``).

A cache directory::

    teacher_cache.json                   the index (JSON): identity, layout, domains, plans, shards
    shards/train-d000.samples.npy        the plan of (split, domain 0): sample ids in shard order
    shards/train-d000-00000.bin          shard 0 of (split, domain 0): rows [start, stop) of that plan
    shards/train-d000-00000.bin.sha256   the shard's checksum, written when it is complete

A shard is raw little-endian arrays back to back (no header, nothing executable; offsets follow
from the row count and the index's layout), ``r`` rows of ``s`` positions and top-``k``::

    sample_id    int64    [r]
    fingerprint  uint64   [r]        blake2b-64 of the row's tokens and labels: the row is this exact text
    ce_sum       float64  [r]        teacher CE (temperature 1) summed over the sample's loss-mask tokens
    ce_tokens    int64    [r]
    ids          uint16 or int32 [r, s, c]   (uint16 when the vocabulary fits)
    log_probs    float16  [r, s, c]  log-probabilities at the cached temperature
    tail         float16  [r, s]     log of the probability mass outside the top-k (-inf when k covers the vocabulary)

``c = k + S`` columns: the top-k, most likely first, then (``--tail-samples S``, layout
``tail_samples``) S tokens drawn from the tail, each standing for 1/S of the tail mass (repeats
allowed; ``topk_kd_loss._sample_tail``). That is ``c * (2 + 2) + 2`` bytes per token with uint16 ids
(130 B at c = 32) and ``c * 6 + 2`` with int32 ids (194 B at c = 32), plus 32 bytes per sample. The index records the ``identity`` the cache
was built for (teacher checkpoint, tokenizer, datasets, seed, sequence length, k, temperature,
precision) and each shard's sha256; a run refuses a cache of another identity, and a shard whose
size or checksum is wrong is named in a one-line error.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_ddk.errors import CheckpointError

INDEX_FILENAME = "teacher_cache.json"
FORMAT = "megatron_ddk teacher cache"
FORMAT_VERSION = 1
SPLITS = ("train", "valid")
LOG_PROB_DTYPE = "float16"
_HASH_CONTENT_LIMIT = 16 << 20
"""Checkpoint files up to this size are hashed by content, larger ones (weight shards) by name and size."""


# ============================================================================================ layout
@dataclass(frozen=True)
class CacheLayout:
    """Shapes and dtypes of every shard of a cache."""

    seq_length: int
    top_k: int
    id_dtype: str
    log_prob_dtype: str = LOG_PROB_DTYPE
    tail_samples: int = 0
    """Columns after the top-k holding tokens sampled from the teacher's tail (``--tail-samples``)."""

    @classmethod
    def for_vocabulary(
        cls, *, seq_length: int, top_k: int, vocab_size: int, tail_samples: int = 0
    ) -> CacheLayout:
        return cls(
            seq_length, top_k, "uint16" if vocab_size <= 1 << 16 else "int32", tail_samples=tail_samples
        )

    @property
    def columns(self) -> int:
        """Cached (id, log-probability) pairs per token: the top-k, then the tail samples."""
        return self.top_k + self.tail_samples

    def fields(self) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        """(name, dtype, per-row shape) in file order."""
        s, k = self.seq_length, self.columns
        return [
            ("sample_id", np.dtype("<i8"), ()),
            ("fingerprint", np.dtype("<u8"), ()),
            ("ce_sum", np.dtype("<f8"), ()),
            ("ce_tokens", np.dtype("<i8"), ()),
            ("ids", np.dtype(self.id_dtype).newbyteorder("<"), (s, k)),
            ("log_probs", np.dtype(self.log_prob_dtype).newbyteorder("<"), (s, k)),
            ("tail", np.dtype(self.log_prob_dtype).newbyteorder("<"), (s,)),
        ]

    def shard_bytes(self, rows: int) -> int:
        return sum(rows * dtype.itemsize * int(np.prod(shape)) for _, dtype, shape in self.fields())

    def bytes_per_token(self) -> float:
        """Storage per token, the per-sample fields included."""
        return self.shard_bytes(1) / self.seq_length

    def to_json(self) -> dict[str, Any]:
        layout = {
            "seq_length": self.seq_length,
            "top_k": self.top_k,
            "id_dtype": self.id_dtype,
            "log_prob_dtype": self.log_prob_dtype,
        }
        if self.tail_samples:  # absent in caches without: they read as before
            layout["tail_samples"] = self.tail_samples
        return layout


def tail_draws(tokens, labels, seq_length: int) -> np.ndarray:
    """The systematic-sampling offsets of one sample's tail draws: ``[seq_length]`` uniforms in [0, 1), float64.

    Seeded by the sample's fingerprint, so a resumed or rebuilt cache (any TP/PP/DP, any micro-batch
    size) draws the same tail tokens for the same text.
    """
    seed = sample_fingerprint(tokens, labels) ^ 0x7461696C  # "tail": not the fingerprint itself
    return np.random.Generator(np.random.PCG64(seed)).random(seq_length)


def sample_fingerprint(tokens, labels) -> int:
    """64-bit blake2b of a sample's tokens and labels (int64, little-endian): ties a cache row to its text."""
    digest = hashlib.blake2b(digest_size=8)
    for values in (tokens, labels):
        digest.update(np.ascontiguousarray(np.asarray(values), dtype="<i8").tobytes())
    return int.from_bytes(digest.digest(), "little")


def shard_name(split: str, domain: int, number: int) -> str:
    return f"shards/{split}-d{domain:03d}-{number:05d}.bin"


def plan_name(split: str, domain: int) -> str:
    return f"shards/{split}-d{domain:03d}.samples.npy"


# ========================================================================================= identity
def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_identity(path: str | os.PathLike, *, flag: str = "--teacher-load") -> dict[str, Any]:
    """A checkpoint's fingerprint: sha256 over every file's name and size and the content of the small
    ones (metadata, common state: they change with every save), without reading the weight shards."""
    from megatron_ddk.checkpointing import resolve_checkpoint

    resolved = resolve_checkpoint(path, flag=flag)
    digest = hashlib.sha256()
    for file in sorted(p for p in resolved.rglob("*") if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(resolved).as_posix()}\0{size}\0".encode())
        if size <= _HASH_CONTENT_LIMIT:
            digest.update(file_sha256(file).encode())
    return {"sha256": digest.hexdigest(), "iteration_dir": resolved.name}


def data_identity(registry, *, seed: int) -> dict[str, Any]:
    """The datasets a cache's sample ids refer to: every .idx file's sha256, the split and the seed
    (GPTDataset's shuffle). File names only: the same data under another path is the same cache."""

    def prefix(p: str) -> dict[str, Any]:
        return {
            "file": Path(p).name,
            "idx_sha256": file_sha256(p + ".idx"),
            "bin_bytes": os.path.getsize(p + ".bin"),
        }

    return {
        "seed": seed,
        "domains": [
            {
                "name": d.name,
                "train": [prefix(p) for p in d.train_prefixes],
                "valid": None if d.valid_prefix is None else prefix(d.valid_prefix),
                "valid_fraction": None if d.valid_prefix is not None else d.valid_fraction,
            }
            for d in registry.domains
        ],
    }


def run_identity(*, tokenizer, registry, seed: int, seq_length: int, temperature: float) -> dict[str, Any]:
    """The part of a cache's identity a training run can check without the teacher."""
    from megatron_ddk.data.tokenizer import tokenizer_identity

    return {
        "tokenizer": tokenizer_identity(tokenizer),
        "data": data_identity(registry, seed=seed),
        "seq_length": seq_length,
        "temperature": float(temperature),
    }


_IDENTITY_WORDS = {
    "teacher": "another teacher checkpoint",
    "tokenizer": "another tokenizer",
    "data": "other datasets (or --seed)",
    "seq_length": "another --seq-length",
    "temperature": "another --kd-temperature",
    "top_k": "another --top-k",
    "tail_samples": "another --tail-samples",
    "precision": "another teacher precision",
}


_IDENTITY_DEFAULTS = {"tail_samples": 0}
"""Identity keys added after format version 1: what a cache without them was built with."""


def identity_differences(cached: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """What differs between two identities, in words, for the keys ``expected`` has."""
    problems = []
    for key, value in expected.items():
        if cached.get(key, _IDENTITY_DEFAULTS.get(key)) != value:
            problems.append(
                f"{_IDENTITY_WORDS.get(key, key)} ({key}: cache {_short(cached.get(key))}, "
                f"this run {_short(value)})"
            )
    return problems


def _short(value) -> str:
    if isinstance(value, dict) and "sha256" in value:
        return f"sha256 {str(value['sha256'])[:12]}"
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else f"sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]}"


# ============================================================================================ write
def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_index(directory: Path, index: dict[str, Any]) -> None:
    write_atomic(directory / INDEX_FILENAME, (json.dumps(index, indent=1, sort_keys=True) + "\n").encode())


def write_shard(path: Path, layout: CacheLayout, arrays: dict[str, np.ndarray]) -> str:
    """Write one shard (then its ``.sha256``) atomically; returns the sha256."""
    rows = len(arrays["sample_id"])
    parts = []
    for name, dtype, shape in layout.fields():
        array = np.ascontiguousarray(arrays[name], dtype=dtype)
        if array.shape != (rows, *shape):
            raise ValueError(f"shard field {name} has shape {array.shape}, expected {(rows, *shape)}")
        parts.append(array.tobytes())
    data = b"".join(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    checksum = hashlib.sha256(data).hexdigest()
    write_atomic(path.with_name(path.name + ".sha256"), (checksum + "\n").encode())
    return checksum


# ============================================================================================= read
def read_index(directory: str | os.PathLike, *, flag: str = "--teacher-cache") -> dict[str, Any]:
    path = Path(directory) / INDEX_FILENAME
    if not path.is_file():
        raise CheckpointError(
            f"{flag} {directory}: no {INDEX_FILENAME}; build the cache with "
            "tools/cache_teacher_logits.py --output DIR"
        )
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); rebuild the cache") from err
    if index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: not a format-{FORMAT_VERSION} {FORMAT}; rebuild it with this version's "
            "tools/cache_teacher_logits.py"
        )
    return index


class TeacherCache:
    """A cache directory opened for reading: location of every cached sample, rows on demand (memory-mapped).

    Opening checks the index and that every finished shard has its recorded size (a truncated shard
    is named at once); ``verify`` checks contents against the sha256 checksums.
    """

    def __init__(self, directory: str | os.PathLike, *, flag: str = "--teacher-cache"):
        self.directory = Path(directory)
        self.flag = flag
        index = read_index(directory, flag=flag)
        self.index = index
        self.identity: dict[str, Any] = index["identity"]
        self.layout = CacheLayout(**index["layout"])
        self.domain_names = [d["name"] for d in index["domains"]]
        self.shards = index["shards"]
        self._maps: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self._open: dict[int, dict[str, np.ndarray]] = {}
        plans = {}
        for key, plan in index["plans"].items():
            file = self.directory / plan["file"]
            self._check_file(file, None, plan["sha256"])  # small: always verified
            plans[key] = np.load(file, allow_pickle=False)
        for number, shard in enumerate(self.shards):
            if shard["sha256"] is None:
                continue  # planned, not finished: its samples count as missing
            self._check_size(number)
            split, domain = shard["split"], shard["domain"]
            where = self._maps.get((split, domain))
            if where is None:
                size = index["domains"][domain][f"{split}_samples"]
                where = (np.full(size, -1, dtype=np.int64), np.zeros(size, dtype=np.int64))
                self._maps[(split, domain)] = where
            samples = plans[f"{split}-d{domain:03d}"][shard["start"] : shard["stop"]]
            where[0][samples] = number
            where[1][samples] = np.arange(len(samples))

    # --------------------------------------------------------------------------------- checks
    def _check_size(self, number: int) -> None:
        shard = self.shards[number]
        path = self.directory / shard["file"]
        expected = self.layout.shard_bytes(shard["stop"] - shard["start"])
        actual = path.stat().st_size if path.exists() else None
        if actual != expected:
            raise CheckpointError(
                f"{self.flag}: shard {path} (sha256 {shard['sha256'][:12]}) is "
                f"{'missing' if actual is None else f'{actual} bytes, expected {expected}'} (truncated or damaged); "
                f"rebuild it: delete it and rerun tools/cache_teacher_logits.py --output {self.directory}"
            )

    def _check_file(self, path: Path, number: int | None, checksum: str) -> None:
        actual = file_sha256(path) if path.exists() else None
        if actual != checksum:
            what = f"shard {path}" if number is not None else f"sample plan {path}"
            raise CheckpointError(
                f"{self.flag}: {what} fails its checksum (sha256 {'missing file' if actual is None else actual[:12]}, "
                f"index says {checksum[:12]}); the cache is damaged: delete that file and rerun "
                f"tools/cache_teacher_logits.py --output {self.directory}"
            )

    def verify(self, shard_numbers: Sequence[int]) -> None:
        """sha256 of the given shards against the index (and each row's sample id against the plan)."""
        for number in shard_numbers:
            shard = self.shards[number]
            self._check_file(self.directory / shard["file"], number, shard["sha256"])

    def check_identity(self, expected: dict[str, Any]) -> None:
        problems = identity_differences(self.identity, expected)
        if problems:
            raise CheckpointError(
                f"{self.flag} {self.directory} was built for {'; '.join(problems)}; "
                "use a cache built for this run, or build one with tools/cache_teacher_logits.py"
            )

    # ------------------------------------------------------------------------------- lookups
    def locate(self, split: str, domain: int, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard number, row) of each sample; shard -1 where the sample is not cached."""
        where = self._maps.get((split, domain))
        ids = np.asarray(sample_ids, dtype=np.int64)
        if where is None:
            return np.full(ids.shape, -1, dtype=np.int64), np.zeros(ids.shape, dtype=np.int64)
        return where[0][ids], where[1][ids]

    def missing(self, split: str, domain: int, sample_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(sample_ids, dtype=np.int64)
        return ids[self.locate(split, domain, ids)[0] < 0]

    def shards_holding(self, split: str, domain: int, sample_ids: np.ndarray) -> set[int]:
        shard, _ = self.locate(split, domain, sample_ids)
        return {int(s) for s in np.unique(shard) if s >= 0}

    def _arrays(self, number: int) -> dict[str, np.ndarray]:
        arrays = self._open.get(number)
        if arrays is None:
            shard = self.shards[number]
            rows = shard["stop"] - shard["start"]
            memory = np.memmap(self.directory / shard["file"], dtype=np.uint8, mode="r")
            arrays, offset = {}, 0
            for name, dtype, shape in self.layout.fields():
                count = rows * int(np.prod(shape))
                arrays[name] = (
                    memory[offset : offset + count * dtype.itemsize].view(dtype).reshape(rows, *shape)
                )
                offset += count * dtype.itemsize
            self._open[number] = arrays
        return arrays

    def row(self, split: str, domain: int, sample_id: int) -> dict[str, np.ndarray] | None:
        """One cached sample's fields (memory-mapped views), or None when it is not cached."""
        shard, row = self.locate(split, domain, np.array([sample_id]))
        if shard[0] < 0:
            return None
        arrays = self._arrays(int(shard[0]))
        fields = {name: values[int(row[0])] for name, values in arrays.items()}
        if int(fields["sample_id"]) != int(sample_id):
            raise CheckpointError(
                f"{self.flag}: shard {self.shards[int(shard[0])]['file']} row {int(row[0])} holds "
                f"sample {int(fields['sample_id'])}, not {sample_id}; the cache is damaged"
            )
        return fields

    def teacher_ce(self, split: str, domain: int, sample_ids: Sequence[int]) -> tuple[float, float]:
        """(sum of the teacher's token CE, number of tokens) over the given samples (all must be cached)."""
        total, tokens = 0.0, 0.0
        for sample in sample_ids:
            fields = self.row(split, domain, int(sample))
            if fields is None:
                raise CheckpointError(
                    f"{self.flag}: {split} sample {sample} of domain "
                    f"{self.domain_names[domain]!r} is not cached"
                )
            total += float(fields["ce_sum"])
            tokens += float(fields["ce_tokens"])
        return total, tokens
