"""The domain registry: YAML/JSON files, Megatron's --data-path form, validation reporting every problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_ddk.data.domains import (
    DataConfigError,
    Domain,
    DomainRegistry,
    check_test_documents_disjoint,
    dataset_summary,
    load_domain_registry,
    registry_from_data_path,
    validate_registry,
)


def write_dataset(prefix: Path, documents: list[list[int]], dtype=np.uint16) -> str:
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in documents:
        builder.add_document(np.array(doc, dtype=np.int64), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.fixture()
def data(tmp_path):
    """code: ids < 50; prose: ids up to 399."""
    write_dataset(tmp_path / "code_text_document", [[5, 6, 7, 2], [8, 9, 2], [40, 2]])
    write_dataset(tmp_path / "prose_text_document", [[10, 399, 2], [11, 12, 13, 2]])
    write_dataset(tmp_path / "prose_valid_text_document", [[14, 15, 2]])
    return tmp_path


def test_yaml_registry(data, monkeypatch):
    (data / "sub").mkdir()
    (data / "sub" / "domains.yaml").write_text(
        "domains:\n"
        "  - {name: code, train: ../code_text_document, weight: 3}\n"
        "  - name: prose\n    train: [../prose_text_document, ../code_text_document]\n"
        "    valid: ../prose_valid_text_document\n"
    )
    monkeypatch.chdir(data / "sub")
    registry = load_domain_registry("domains.yaml")  # relative prefixes: against the file's directory
    assert registry.names == ["code", "prose"]
    np.testing.assert_allclose(registry.initial_weights, [0.75, 0.25])
    assert registry.initial_weights.dtype == np.float64
    code, prose = registry.domains
    assert code == Domain(
        name="code",
        train_prefixes=(str(data / "code_text_document"),),
        valid_prefix=None,
        valid_fraction=0.01,
        weight=3.0,
    )
    assert prose.train_prefixes == (str(data / "prose_text_document"), str(data / "code_text_document"))
    assert prose.valid_prefix == str(data / "prose_valid_text_document") and prose.weight == 1.0
    assert registry.source == "--domains domains.yaml"
    validate_registry(registry, vocab_size=400)


def test_test_splits(data):
    write_dataset(data / "code_test_text_document", [[30, 31, 2]])
    write_dataset(data / "leaky_test_text_document", [[31, 2], [8, 9, 2]])  # [8, 9, 2] is a training document
    (data / "domains.yaml").write_text(
        "domains:\n"
        "  - {name: code, train: code_text_document, test: code_test_text_document}\n"
        "  - {name: prose, train: prose_text_document, valid: prose_valid_text_document, test_fraction: 0.2}\n"
    )
    registry = load_domain_registry(data / "domains.yaml")
    code, prose = registry.domains
    assert code.test_prefix == str(data / "code_test_text_document") and code.test_fraction == 0.0
    assert prose.test_prefix is None and prose.test_fraction == 0.2
    assert registry.has_test_split
    validate_registry(registry, vocab_size=400)
    check_test_documents_disjoint(registry)
    leaky = DomainRegistry(
        domains=(
            Domain(
                name="code",
                train_prefixes=(str(data / "code_text_document"),),
                test_prefix=str(data / "leaky_test_text_document"),
            ),
        ),
        source="--domains r",
    )
    with pytest.raises(DataConfigError, match="shares 1 documents with its training/validation data") as err:
        check_test_documents_disjoint(leaky)
    assert len(str(err.value).splitlines()) == 1
    assert not DomainRegistry(domains=(Domain(name="x", train_prefixes=("p",)),)).has_test_split
    (data / "bad.yaml").write_text(
        "domains:\n  - {name: c, train: code_text_document, test: t, test_fraction: 0.1}\n"
    )
    with pytest.raises(DataConfigError, match="either 'test' or 'test_fraction'"):
        load_domain_registry(data / "bad.yaml")


def test_json_registry_by_extension(data):
    (data / "reg.json").write_text(
        json.dumps(
            {
                "domains": [
                    {
                        "name": "code",
                        "train": str(data / "code_text_document"),
                        "valid_fraction": 0.3,
                        "weight": 0.5,
                    }
                ]
            }
        )
    )
    registry = load_domain_registry(data / "reg.json")
    assert registry.domains[0].valid_fraction == 0.3 and registry.initial_weights.tolist() == [1.0]
    validate_registry(registry, vocab_size=50)


def test_structural_problems_are_reported_together(tmp_path):
    path = tmp_path / "domains.yaml"
    path.write_text(
        "domains:\n"
        "  - {train: a}\n"
        "  - {name: b, train: [], weight: heavy}\n"
        "  - {name: c, train: c, valid: v, valid_fraction: 0.1, colour: red}\n"
        "  - just a string\n"
    )
    with pytest.raises(DataConfigError) as err:
        load_domain_registry(path)
    lines = str(err.value).splitlines()
    assert all(line.startswith(f"--domains {path}: domain") for line in lines)
    text = str(err.value)
    assert "domain #1: 'name' must be a non-empty string" in text
    assert (
        "domain 'b': 'train' must be a dataset prefix" in text
        and "domain 'b': weight 'heavy' is not a number" in text
    )
    assert "domain 'c': unknown keys ['colour']" in text and "either 'valid' or 'valid_fraction'" in text
    assert "domain #4: expected a mapping" in text and len(lines) == 6


@pytest.mark.parametrize(
    "content,needle",
    [
        (None, "no such file"),
        ("domains: [", "cannot parse"),
        ("domains: []", "non-empty 'domains:' list"),
        ("- a\n- b\n", "non-empty 'domains:' list"),
    ],
)
def test_unreadable_registry_files(tmp_path, content, needle):
    path = tmp_path / "domains.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataConfigError, match=needle) as err:
        load_domain_registry(path)
    assert len(str(err.value).splitlines()) == 1 and str(path) in str(err.value)


def test_validation_reports_every_problem(data):
    code, prose = str(data / "code_text_document"), str(data / "prose_text_document")
    registry = DomainRegistry(
        domains=(
            Domain(name="code", train_prefixes=(code,), weight=0.0),
            Domain(name="code", train_prefixes=(str(data / "missing_text_document"),), weight=float("nan")),
            Domain(name="prose", train_prefixes=(prose,), valid_fraction=1.5),
            Domain(name="both", train_prefixes=(code,), valid_prefix=code),
            Domain(name="tested", train_prefixes=(code,), valid_prefix=prose, test_prefix=code),
            Domain(name="peeking", train_prefixes=(code,), valid_prefix=prose, test_prefix=prose),
            Domain(name="greedy", train_prefixes=(code,), valid_fraction=0.5, test_fraction=0.6),
        ),
        source="--domains reg.yaml",
    )
    with pytest.raises(DataConfigError) as err:
        validate_registry(registry, vocab_size=100)
    lines = str(err.value).splitlines()
    assert all(line.startswith("--domains reg.yaml: ") for line in lines)
    expected = [
        "domain 'code': weight 0.0 must be a finite number > 0",
        "duplicate domain name 'code'",
        "domain 'code': weight nan must be a finite number > 0",
        f"domain 'code': missing {data}/missing_text_document.bin and {data}/missing_text_document.idx",
        "domain 'prose': valid_fraction 1.5 must be in (0, 1)",
        f"domain 'prose': {prose} holds token id 399 but the tokenizer has 100 tokens",
        f"domain 'both': valid prefix {code} is also a training prefix",
        f"domain 'tested': test prefix {code} is also a training prefix",
        f"domain 'peeking': test prefix {prose} is also the 'valid' prefix",
        "domain 'greedy': test_fraction 0.6 must be in [0, 1) and leave training documents",
    ]
    assert (
        len(lines) == len(expected) + 2
    )  # prose's token ids, reported again for the two domains validating on it
    for needle in expected:
        assert any(needle in line for line in lines), needle
    with pytest.raises(DataConfigError, match="no domains"):
        validate_registry(DomainRegistry(domains=()), vocab_size=100)


def test_damaged_and_empty_datasets(data):
    write_dataset(data / "empty_text_document", [])
    truncated = data / "cut_text_document"
    write_dataset(truncated, [[1, 2, 3, 4]])
    Path(f"{truncated}.bin").write_bytes(Path(f"{truncated}.bin").read_bytes()[:-2])
    registry = registry_from_data_path([str(data / "empty_text_document"), str(truncated)])
    with pytest.raises(DataConfigError) as err:
        validate_registry(registry, vocab_size=100)
    message = str(err.value)
    assert "domain 'empty': " in message and "holds no documents" in message
    assert "domain 'cut': cannot read" in message and "describes 4 uint16 tokens" in message


def test_ranks_other_than_0_check_files_but_do_not_read_the_tokens(data):
    prose = str(data / "prose_text_document")
    registry = registry_from_data_path([prose, str(data / "missing_text_document")])
    with pytest.raises(DataConfigError) as err:
        validate_registry(registry, vocab_size=100, scan_token_ids=False)
    message = str(err.value)
    assert "missing_text_document.bin" in message and "holds token id" not in message
    with pytest.raises(DataConfigError, match="holds token id 399"):
        validate_registry(registry, vocab_size=100)
    assert dataset_summary(prose, scan_tokens=False)[1] == -1


def test_max_token_id_is_read_in_chunks(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 70000, size=int(n)).tolist() for n in rng.integers(1, 40, size=50)]
    prefix = write_dataset(tmp_path / "big", docs, dtype=np.int32)
    expected = max(max(d) for d in docs)
    assert dataset_summary(prefix, chunk_tokens=7) == (50, expected)
    assert dataset_summary(prefix) == (50, expected)


def test_data_path_forms(data):
    code, prose = str(data / "code_text_document"), str(data / "prose_text_document")
    weighted = registry_from_data_path(["0.3", code, "0.7", prose])
    assert weighted.names == ["code", "prose"] and weighted.source == "--data-path"
    np.testing.assert_allclose(weighted.initial_weights, [0.3, 0.7])
    assert weighted.domains[0].train_prefixes == (code,) and weighted.domains[0].valid_prefix is None
    equal = registry_from_data_path([code, prose])
    np.testing.assert_allclose(equal.initial_weights, [0.5, 0.5])
    assert registry_from_data_path(["1", str(data / "web")]).names == ["web"]
    validate_registry(weighted, vocab_size=400)


@pytest.mark.parametrize(
    "tokens,needle",
    [
        ([], "--data-path is empty"),
        (["0.5", "a", "0.5"], "must alternate"),
        (["0.5", "a", "b", "c"], "'b' where a weight was expected"),
        (["0.5", "a", "0.5", "0.2"], "'0.2' where a dataset prefix was expected"),
        (["x/code_text_document", "y/code_text_document"], "would all be domain 'code'"),
    ],
)
def test_data_path_errors(tokens, needle):
    with pytest.raises(DataConfigError, match=needle):
        registry_from_data_path(tokens)


def test_demo_corpus_is_deterministic_and_writes_its_registry(tmp_path, capsys):
    from tools.make_demo_corpus import DOMAINS, main

    assert main(["--output-dir", str(tmp_path / "one"), "--size-mb", "0.08", "--seed", "3"]) == 0
    assert "demo corpus in" in capsys.readouterr().out
    main(["--output-dir", str(tmp_path / "two"), "--size-mb", "0.08", "--seed", "3"])
    main(["--output-dir", str(tmp_path / "three"), "--size-mb", "0.08", "--seed", "4"])
    assert len(DOMAINS) >= 4
    for name in DOMAINS:
        first = (tmp_path / "one" / f"{name}.jsonl").read_bytes()
        assert first == (tmp_path / "two" / f"{name}.jsonl").read_bytes()
        texts = [json.loads(line)["text"] for line in first.decode().splitlines()]
        assert texts and all(isinstance(t, str) and t.strip() for t in texts)
        assert 0.015e6 <= len(first) <= 0.04e6  # an even share of 0.08 MB, give or take a document
    assert (tmp_path / "one" / "records.jsonl").read_bytes() != (
        tmp_path / "three" / "records.jsonl"
    ).read_bytes()
    registry = load_domain_registry(tmp_path / "one" / "domains.yaml")
    assert registry.names == list(DOMAINS)
    for domain in registry.domains:
        assert domain.train_prefixes == (str(tmp_path / "one" / f"{domain.name}_text_document"),)
        assert (domain.valid_prefix, domain.valid_fraction, domain.weight) == (None, 0.05, 1.0)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(
        [f"{n}.jsonl" for n in DOMAINS] + ["domains.yaml"]
    )


def test_local_corpus_splits_documents_without_overlap(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import make_local_corpus

    documents = [f"document {i} " * 30 for i in range(40)] + ["document 0 " * 30]  # one duplicate
    rng = __import__("random").Random(3)
    kept = make_local_corpus.collect(lambda: iter(documents), rng, budget_bytes=10**9)
    assert len(kept) == 40  # de-duplicated before the split
    splits = make_local_corpus.split_documents(kept, 0.1, 0.1)
    assert [len(splits[k]) for k in ("train", "valid", "test")] == [32, 4, 4]
    assert not set(splits["test"]) & (set(splits["train"]) | set(splits["valid"]))
    assert make_local_corpus.collect(lambda: iter(documents), __import__("random").Random(3), 10**9) == kept
