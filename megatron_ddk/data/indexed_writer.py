"""Write megatron-core's indexed dataset format (``.bin`` tokens + ``.idx`` index) with numpy alone.

Byte for byte what ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`` writes for
documents of one sequence each (Megatron-LM's ``preprocess_data.py`` without ``--split-sentences``),
without importing megatron-core and torch (4-8 s), and appending whole batches of documents at once.
``tests/unit/test_indexed_writer.py`` compares the bytes with megatron-core's builder.

``.idx`` layout (little-endian): the header ``MMIDIDX\\0\\0``, version ``<Q`` 1, dtype code ``<B``,
sequence count ``<Q``, document count + 1 ``<Q``, sequence lengths int32, sequence byte offsets int64,
document boundaries int64 (``[0, 1, ..., n]`` here: one sequence per document).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}
"""megatron-core's ``DType`` enum values."""


def optimal_dtype(vocab_size: int) -> type[np.number]:
    """megatron-core's ``DType.optimal_dtype``: uint16 below 65500 token ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedDatasetWriter:
    """Appends documents to ``bin_path`` as they come; ``finalize`` writes the index."""

    def __init__(self, bin_path: str | Path, dtype: type[np.number]):
        if dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {dtype}")
        self.dtype = dtype
        self._bin = open(bin_path, "wb")
        self._lengths: list[np.ndarray] = []

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """``tokens``: the documents' ids concatenated; ``lengths``: tokens per document, in order."""
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths add up to {int(lengths.sum())} but {tokens.size} tokens were given")
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int32))

    def finalize(self, idx_path: str | Path) -> None:
        """Close the ``.bin`` and write the ``.idx`` next to it."""
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        offsets = np.zeros(lengths.size, dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(self.dtype).itemsize, out=offsets[1:])
        documents = np.arange(lengths.size + 1, dtype=np.int64)
        with open(idx_path, "wb") as idx:
            idx.write(INDEX_HEADER)
            idx.write(struct.pack("<Q", INDEX_VERSION))
            idx.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            idx.write(struct.pack("<Q", lengths.size))
            idx.write(struct.pack("<Q", documents.size))
            idx.write(lengths.tobytes())
            idx.write(offsets.tobytes())
            idx.write(documents.tobytes())

    def close(self) -> None:
        """Close without writing an index (the run failed)."""
        self._bin.close()
