"""megatron_ddk.data.indexed_writer writes the same bytes as megatron-core's IndexedDatasetBuilder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from megatron_ddk.data.indexed_writer import IndexedDatasetWriter, optimal_dtype


@pytest.mark.parametrize("vocab_size", [400, 65499, 65500, 200000])
def test_same_bytes_as_megatron_core(tmp_path, vocab_size):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab_size, size=int(n)) for n in rng.integers(1, 50, size=37)]
    dtype = DType.optimal_dtype(vocab_size)
    assert optimal_dtype(vocab_size) is dtype
    theirs = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype)
    for doc in docs:
        theirs.add_document(torch.tensor(doc), [len(doc)])
    theirs.finalize(str(tmp_path / "theirs.idx"))
    ours = IndexedDatasetWriter(tmp_path / "ours.bin", dtype)
    for batch in (docs[:1], docs[1:20], [], docs[20:]):  # batches of any size, even empty
        lengths = np.array([len(d) for d in batch], dtype=np.int32)
        ours.add_documents(np.concatenate(batch) if batch else np.zeros(0, np.int64), lengths)
    ours.finalize(tmp_path / "ours.idx")
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes()
    dataset = IndexedDataset(str(tmp_path / "ours"))
    assert [dataset[i].tolist() for i in range(len(dataset))] == [d.tolist() for d in docs]


def test_lengths_must_cover_the_tokens(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "x.bin", np.uint16)
    with pytest.raises(ValueError, match="lengths add up to 3 but 2 tokens"):
        writer.add_documents(np.array([1, 2]), np.array([3], dtype=np.int32))
    writer.close()
