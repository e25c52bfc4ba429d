"""The teacher cache format: bytes per token, round trip through memory maps, checksums, identity refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_ddk.distill import teacher_cache as tc
from megatron_ddk.errors import CheckpointError

S, K = 6, 3


def test_bytes_per_token_at_k32():
    small = tc.CacheLayout.for_vocabulary(seq_length=2048, top_k=32, vocab_size=32000)  # LLaMA-2
    large = tc.CacheLayout.for_vocabulary(seq_length=2048, top_k=32, vocab_size=151936)  # Qwen
    assert (small.id_dtype, large.id_dtype) == ("uint16", "int32")
    assert small.bytes_per_token() == pytest.approx(32 * 4 + 2 + 32 / 2048)  # 130.02
    assert large.bytes_per_token() == pytest.approx(32 * 6 + 2 + 32 / 2048)  # 194.02
    assert large.bytes_per_token() <= 200


def rows(samples, seed=0):
    rng = np.random.default_rng(seed)
    n = len(samples)
    tokens = rng.integers(0, 500, (n, S + 1))
    return tokens, {
        "sample_id": np.asarray(samples),
        "ce_sum": rng.uniform(0, 50, n),
        "ce_tokens": np.full(n, S),
        "fingerprint": np.array([tc.sample_fingerprint(t[:-1], t[1:]) for t in tokens], dtype=np.uint64),
        "ids": rng.integers(0, 500, (n, S, K)),
        "log_probs": -rng.uniform(0, 9, (n, S, K)),
        "tail": -rng.uniform(0, 3, (n, S)),
    }


@pytest.fixture
def cache_dir(tmp_path):
    """Domain 0: train samples 7 and 2 in one shard, 5 in a second; domain 1 nothing; one unfinished shard."""
    layout = tc.CacheLayout(S, K, "uint16")
    plan = np.array([7, 2, 5, 9])
    (tmp_path / "shards").mkdir()
    np.save(tmp_path / tc.plan_name("train", 0), plan, allow_pickle=False)
    shards = []
    for number, (start, stop) in enumerate([(0, 2), (2, 3), (3, 4)]):
        _, arrays = rows(plan[start:stop], seed=number)
        checksum = tc.write_shard(tmp_path / tc.shard_name("train", 0, number), layout, arrays)
        shards.append(
            {
                "file": tc.shard_name("train", 0, number),
                "split": "train",
                "domain": 0,
                "start": start,
                "stop": stop,
                "sha256": checksum if number < 2 else None,
            }
        )
    index = {
        "format": tc.FORMAT,
        "format_version": tc.FORMAT_VERSION,
        "layout": layout.to_json(),
        "identity": {"seq_length": S, "tokenizer": {"sha256": "a" * 64}, "temperature": 1.0},
        "domains": [
            {"name": "a", "train_samples": 10, "valid_samples": 1},
            {"name": "b", "train_samples": 4, "valid_samples": 1},
        ],
        "plans": {
            "train-d000": {
                "file": tc.plan_name("train", 0),
                "count": 4,
                "sha256": tc.file_sha256(tmp_path / tc.plan_name("train", 0)),
            }
        },
        "shards": shards,
    }
    tc.write_index(tmp_path, index)
    return tmp_path


def test_round_trip(cache_dir):
    cache = tc.TeacherCache(cache_dir)
    shard, row = cache.locate("train", 0, np.array([2, 5, 9, 0]))
    assert shard.tolist() == [0, 1, -1, -1] and row.tolist() == [1, 0, 0, 0]  # 9: its shard is unfinished
    assert cache.missing("train", 0, np.arange(10)).tolist() == [0, 1, 3, 4, 6, 8, 9]
    assert cache.missing("train", 1, np.arange(2)).tolist() == [0, 1]
    _, arrays = rows(np.array([7, 2]), seed=0)
    got = cache.row("train", 0, 2)
    assert int(got["sample_id"]) == 2
    np.testing.assert_array_equal(got["ids"], arrays["ids"][1].astype(np.uint16))
    np.testing.assert_array_equal(got["log_probs"], arrays["log_probs"][1].astype(np.float16))
    assert isinstance(got["ids"].base, np.memmap) or isinstance(got["ids"], np.memmap)
    assert cache.teacher_ce("train", 0, [7, 2]) == pytest.approx((arrays["ce_sum"].sum(), 2 * S))
    assert cache.shards_holding("train", 0, np.array([7, 2, 5, 9])) == {0, 1}
    cache.verify([0, 1])


def test_corrupted_shard_is_named_by_its_checksum(cache_dir):
    path = cache_dir / tc.shard_name("train", 0, 1)
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF
    path.write_bytes(bytes(data))
    cache = tc.TeacherCache(cache_dir)  # sizes are fine
    cache.verify([0])
    with pytest.raises(CheckpointError, match=r"shard .*train-d000-00001.bin fails its checksum") as err:
        cache.verify([1])
    assert "\n" not in str(err.value)


def test_truncated_shard_is_refused_on_open(cache_dir):
    path = cache_dir / tc.shard_name("train", 0, 0)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(
        CheckpointError,
        match=r"train-d000-00000.bin \(sha256 [0-9a-f]{12}\) is 227 bytes, expected 232 \(truncated",
    ):
        tc.TeacherCache(cache_dir)


def test_identity_refusal_names_what_differs(cache_dir):
    cache = tc.TeacherCache(cache_dir)
    cache.check_identity({"seq_length": S, "temperature": 1.0})
    with pytest.raises(CheckpointError, match=r"another --seq-length \(seq_length: cache 6, this run 8\)"):
        cache.check_identity({"seq_length": 8})
    with pytest.raises(CheckpointError, match="another tokenizer"):
        cache.check_identity({"tokenizer": {"sha256": "b" * 64}})


def test_not_a_cache(tmp_path):
    with pytest.raises(CheckpointError, match="no teacher_cache.json"):
        tc.TeacherCache(tmp_path)
    (tmp_path / tc.INDEX_FILENAME).write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a format-1"):
        tc.TeacherCache(tmp_path)


def test_fingerprint_depends_on_tokens_and_labels():
    a = tc.sample_fingerprint([1, 2, 3], [2, 3, 4])
    assert a == tc.sample_fingerprint(np.array([1, 2, 3], dtype=np.int32), np.array([2, 3, 4]))
    assert a != tc.sample_fingerprint([1, 2, 3], [2, 3, 5])
