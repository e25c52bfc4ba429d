"""Per-domain GPTDatasets: exactly one epoch, document-level validation split, deterministic, cache elsewhere.

The corpus is preprocessed from text with a word-level tokenizer, so document k is made of token id
``4 + k`` only (then EOD) and every sample shows which documents it came from.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter

import pytest
import torch
from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ddk.data.datasets import ConcatSamples, build_domain_datasets, split_string
from megatron_ddk.data.domains import Domain, DomainRegistry, load_domain_registry
from megatron_ddk.data.tokenizer import build_tokenizer
from tests.helpers import read_json, torchrun
from tools.preprocess_data import preprocess

EOD = 2
SEQ = 8


def doc_length(k: int) -> int:
    return 3 + k % 7


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Tokenizer dir (no pad token: pad = eod) and datasets a (40 docs), b (10 docs), c (6 docs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("corpus")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": EOD, **{f"w{i}": i for i in range(3, 400)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(root / "tokenizer.json"))
    for name, first, count in (("a", 0, 40), ("b", 100, 10), ("c", 200, 6)):
        src = root / f"{name}.jsonl"
        src.write_text(
            "".join(
                json.dumps({"text": " ".join([f"w{4 + k}"] * doc_length(k))}) + "\n"
                for k in range(first, first + count)
            )
        )
        preprocess(
            [str(src)],
            str(root / name),
            tokenizer_type="HuggingFaceTokenizer",
            tokenizer_model=str(root),
            append_eod=True,
            progress=False,
        )
    return root


def prefix(corpus, name: str) -> str:
    return str(corpus / f"{name}_text_document")


def build(corpus, registry, *, cache, seed=1, seq_length=SEQ):
    tokenizer = build_tokenizer("HuggingFaceTokenizer", corpus)
    return build_domain_datasets(
        registry, tokenizer=tokenizer, seq_length=seq_length, seed=seed, cache_dir=str(cache)
    )


def num_tokens(path: str) -> int:
    dataset = IndexedDataset(path)  # keep it alive: its arrays are views of its memory map
    return int(dataset.sequence_lengths.sum())


def documents_in(dataset) -> Counter:
    """Token counts over every sample's ``tokens`` (windows overlap only in the label token)."""
    counts = Counter()
    for i in range(len(dataset)):
        counts.update(dataset[i]["tokens"].tolist())
    return counts


def test_one_epoch_and_document_level_split(corpus, tmp_path):
    registry = DomainRegistry(
        domains=(Domain(name="a", train_prefixes=(prefix(corpus, "a"),), valid_fraction=0.1),)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [domain] = build(corpus, registry, cache=tmp_path / "cache")
    assert not [w for w in caught if "pad token" in str(w.message)]  # pad == eod is handled quietly
    train_docs, valid_docs = range(0, 36), range(36, 40)  # megatron rounds 0.9 * 40
    train_tokens = sum(doc_length(k) + 1 for k in train_docs)
    assert domain.name == "a" and len(domain.train) == (train_tokens - 1) // SEQ  # exactly one epoch
    assert len(domain.valid) == (sum(doc_length(k) + 1 for k in valid_docs) - 1) // SEQ
    seen_train, seen_valid = documents_in(domain.train), documents_in(domain.valid)
    assert set(seen_train) - {EOD} <= {4 + k for k in train_docs}
    assert set(seen_valid) - {EOD} <= {4 + k for k in valid_docs}  # never a training document
    # every document at most once: the windows tile one pass over the shuffled documents
    assert all(seen_train[4 + k] <= doc_length(k) for k in train_docs)
    assert sum(seen_train.values()) == len(domain.train) * SEQ > train_tokens - SEQ - 1
    sample = domain.train[0]
    assert sorted(sample) == ["labels", "loss_mask", "position_ids", "tokens"]  # no attention mask
    assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
    assert torch.equal(sample["position_ids"], torch.arange(SEQ))
    # EOD stays a token and a trained-on label, though it doubles as the pad id
    assert seen_train[EOD] > 0
    assert all(bool(domain.train[i]["loss_mask"].eq(1).all()) for i in range(len(domain.train)))


def test_valid_prefix_and_several_training_prefixes(corpus, tmp_path):
    registry = DomainRegistry(
        domains=(
            Domain(
                name="ab",
                train_prefixes=(prefix(corpus, "a"), prefix(corpus, "b")),
                valid_prefix=prefix(corpus, "c"),
            ),
            Domain(name="b", train_prefixes=(prefix(corpus, "b"),), valid_fraction=0.2),
        )
    )
    ab, b = build(corpus, registry, cache=tmp_path / "cache")
    tokens_a, tokens_b = (num_tokens(prefix(corpus, name)) for name in ("a", "b"))
    assert isinstance(ab.train, ConcatSamples)
    assert len(ab.train) == (tokens_a - 1) // SEQ + (tokens_b - 1) // SEQ  # every document of both prefixes
    first_b = ab.train.parts[1][0]["tokens"]
    assert torch.equal(ab.train[(tokens_a - 1) // SEQ]["tokens"], first_b)
    assert torch.equal(ab.train[-1]["tokens"], ab.train.parts[1][len(ab.train.parts[1]) - 1]["tokens"])
    with pytest.raises(IndexError):
        ab.train[len(ab.train)]
    assert set(documents_in(ab.valid)) - {EOD} <= {4 + k for k in range(200, 206)}
    assert set(documents_in(b.valid)) - {EOD} <= {4 + k for k in (108, 109)}  # last 20% of b's documents


def test_deterministic_in_seed_and_cache_stays_out_of_the_data(corpus, tmp_path):
    registry = DomainRegistry(
        domains=(Domain(name="a", train_prefixes=(prefix(corpus, "a"),), valid_fraction=0.1),)
    )
    before = sorted(p.name for p in corpus.iterdir())

    def samples(seed, cache):
        [domain] = build(corpus, registry, cache=tmp_path / cache, seed=seed)
        return torch.stack([domain.train[i]["tokens"] for i in range(len(domain.train))])

    first, again, other = samples(1, "one"), samples(1, "two"), samples(2, "three")
    assert torch.equal(first, again)
    assert not torch.equal(first, other) and first.shape == other.shape
    assert sorted(p.name for p in corpus.iterdir()) == before  # no cache/ next to the data
    assert any((tmp_path / "one").glob("*GPTDataset-train-shuffle_index.npy"))


def test_empty_splits_are_reported(corpus, tmp_path):
    too_few = DomainRegistry(
        domains=(Domain(name="c", train_prefixes=(prefix(corpus, "c"),), valid_fraction=0.01),)
    )
    with pytest.raises(
        ValueError, match=r"domain 'c': valid_fraction 0.01 of the 6 documents .* 0 for validation"
    ):
        build(corpus, too_few, cache=tmp_path / "cache")
    short = DomainRegistry(
        domains=(Domain(name="c", train_prefixes=(prefix(corpus, "c"),), valid_fraction=0.5),)
    )
    with pytest.raises(
        ValueError, match=r"domain 'c' has \d+ training and 0 validation samples of 64 tokens"
    ):
        build(corpus, short, cache=tmp_path / "cache", seq_length=64)


def test_split_string_is_fixed_point():
    assert parse_and_normalize_split(split_string(1e-5)) == pytest.approx([1 - 1e-5, 1e-5, 0.0])
    assert parse_and_normalize_split(split_string(0.05)) == pytest.approx([0.95, 0.05, 0.0])


def test_two_ranks_share_one_cache(corpus, tmp_path):
    registry = tmp_path / "domains.yaml"
    registry.write_text(
        f"domains:\n  - {{name: a, train: {prefix(corpus, 'a')}, valid_fraction: 0.1}}\n"
        f"  - {{name: b, train: {prefix(corpus, 'b')}, valid: {prefix(corpus, 'c')}}}\n"
    )
    out = tmp_path / "ranks.json"
    torchrun(
        "tests/scripts/build_domain_datasets.py", 2, registry, corpus, tmp_path / "shared", out, timeout=300
    )
    rank0, rank1 = read_json(out)
    assert rank0 == rank1
    local = build(corpus, load_domain_registry(registry), cache=tmp_path / "local", seed=5)
    for domain in local:
        assert rank0[domain.name]["train"] == len(domain.train) and rank0[domain.name]["valid"] == len(
            domain.valid
        )
        assert rank0[domain.name]["first"] == [domain.train[i]["tokens"].tolist() for i in range(3)]
    cached = sorted(p.name.split("-", 1)[1] for p in (tmp_path / "shared").glob("*-description.txt"))
    assert cached == ["GPTDataset-train-description.txt"] * 2 + ["GPTDataset-valid-description.txt"] * 2
    assert sorted(rank0) == ["a", "b"]
