"""Tokenizers, preprocess_data (read back by megatron-core token for token), the domain registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ddk.data.domains import (
    DataConfigError,
    load_domain_registry,
    registry_from_data_path,
    validate_registry,
)
from megatron_ddk.data.tokenizer import build_tokenizer, tokenizer_identity
from tests.helpers import python

DOCS = ["def f(x):\n    return x + 1", "The quick brown fox jumps over the lazy dog.", "12 + 30 = 42",
        '{"id": 7, "ok": true}', "ünïcödé text ✓"] * 8


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    python("tools/train_tokenizer.py", "--input", corpus, "--output-prefix", root / "tok", "--vocab-size", "400",
           "--num-threads", "1")
    return root


def test_sentencepiece_tokenizer(spm):
    tok = build_tokenizer("SentencePieceTokenizer", spm / "tok.model")
    assert tok.vocab_size == 400 and tok.eod == 2 and tok.pad == 3
    ids = tok.tokenize(DOCS[1])
    assert tok.detokenize(ids) == DOCS[1]
    identity = tokenizer_identity(tok)
    assert identity["type"] == "SentencePieceTokenizer" and len(identity["sha256"]) == 64


def test_huggingface_tokenizer_matches_transformers(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # as Qwen/Llama-3 tokenizer.json
    raw.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>", "<pad>"]))
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    tok = build_tokenizer("HuggingFaceTokenizer", tmp_path)
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in DOCS[:5]:
        assert tok.tokenize(text) == reference(text, add_special_tokens=False)["input_ids"]
    assert tok.eod == raw.token_to_id("</s>") and tok.pad == raw.token_to_id("<pad>")
    assert tok.vocab_size == raw.get_vocab_size()


@pytest.mark.parametrize("kind,model,needle", [
    ("GPT2BPETokenizer", "x", "--tokenizer-type"),
    ("SentencePieceTokenizer", "/nonexistent.model", "--tokenizer-model"),
    ("HuggingFaceTokenizer", "/tmp", "tokenizer.json"),
])
def test_tokenizer_errors(kind, model, needle):
    with pytest.raises((ValueError, FileNotFoundError), match=needle):
        build_tokenizer(kind, model)


def preprocess(spm, tmp, lines, *extra, check=True):
    src = tmp / "in.jsonl"
    src.write_text("".join(lines))
    return python("tools/preprocess_data.py", "--input", src, "--output-prefix", tmp / "out",
                  "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", spm / "tok.model",
                  "--no-progress", *extra, check=check)


def test_preprocess_reads_back_token_for_token(spm, tmp_path):
    lines = [json.dumps({"text": d}) + "\n" for d in DOCS]
    out = preprocess(spm, tmp_path, lines, "--append-eod")
    assert "documents=40" in out.stdout and "tokens/s=" in out.stdout
    tok = build_tokenizer("SentencePieceTokenizer", spm / "tok.model")
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    assert len(dataset) == len(DOCS)
    for i, doc in enumerate(DOCS):
        assert dataset[i].tolist() == tok.tokenize(doc) + [tok.eod]
    assert dataset.index.dtype == np.uint16
    first = (tmp_path / "out_text_document.bin").read_bytes()
    (tmp_path / "two").mkdir()
    preprocess(spm, tmp_path / "two", lines, "--append-eod", "--workers", "2")
    assert (tmp_path / "two" / "out_text_document.bin").read_bytes() == first


def test_preprocess_bad_lines(spm, tmp_path):
    good = json.dumps({"text": "hello world"}) + "\n"
    lines = [good, "{not json\n", json.dumps({"body": "x"}) + "\n", json.dumps({"text": ""}) + "\n",
             json.dumps({"text": 5}) + "\n", good]
    failed = preprocess(spm, tmp_path, lines, check=False)
    assert failed.returncode != 0
    assert "in.jsonl:2: malformed JSON" in failed.stderr and "--on-bad-lines skip" in failed.stderr
    assert not list(tmp_path.glob("out_*"))  # nothing written
    skipped = preprocess(spm, tmp_path, lines, "--on-bad-lines", "skip")
    assert "documents=2" in skipped.stdout
    for kind in ("1 malformed JSON", "1 missing key", "1 empty document", "1 not a string"):
        assert kind in skipped.stdout
    assert "in.jsonl:3" in skipped.stdout


def test_preprocess_never_overwrites_silently(spm, tmp_path):
    lines = [json.dumps({"text": "one two"}) + "\n"]
    preprocess(spm, tmp_path, lines)
    before = (tmp_path / "out_text_document.bin").read_bytes()
    again = preprocess(spm, tmp_path, [json.dumps({"text": "three"}) + "\n"], check=False)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert (tmp_path / "out_text_document.bin").read_bytes() == before
    broken = preprocess(spm, tmp_path, ["{bad\n"], "--overwrite", check=False)
    assert broken.returncode != 0 and (tmp_path / "out_text_document.bin").read_bytes() == before


@pytest.fixture()
def two_domains(spm, tmp_path):
    for name in ("code", "prose"):
        preprocess(spm, tmp_path, [json.dumps({"text": d}) + "\n" for d in DOCS], "--overwrite")
        for ext in (".bin", ".idx"):
            Path(tmp_path / f"out_text_document{ext}").rename(tmp_path / f"{name}_text_document{ext}")
    return tmp_path


def test_registry_yaml_and_data_path(two_domains):
    reg_file = two_domains / "domains.yaml"
    reg_file.write_text("domains:\n  - {name: code, train: code_text_document, weight: 3}\n"
                        "  - {name: prose, train: [prose_text_document], valid: code_text_document, weight: 1}\n")
    registry = load_domain_registry(reg_file)
    assert registry.names == ["code", "prose"]
    np.testing.assert_allclose(registry.initial_weights, [0.75, 0.25])
    assert registry.domains[1].valid_prefix == str(two_domains / "code_text_document")
    validate_registry(registry, vocab_size=400)
    static = registry_from_data_path(["0.3", str(two_domains / "code_text_document"),
                                      "0.7", str(two_domains / "prose_text_document")])
    assert static.names == ["code", "prose"] and static.initial_weights.tolist() == pytest.approx([0.3, 0.7])
    validate_registry(static, vocab_size=400)


def test_registry_reports_every_problem(two_domains):
    reg_file = two_domains / "domains.json"
    reg_file.write_text(json.dumps({"domains": [
        {"name": "code", "train": "code_text_document", "weight": 0},
        {"name": "code", "train": "missing_text_document"},
        {"name": "prose", "train": "prose_text_document", "valid_fraction": 1.5},
    ]}))
    with pytest.raises(DataConfigError) as err:
        validate_registry(load_domain_registry(reg_file), vocab_size=100)
    message = str(err.value)
    assert "weight 0.0" in message and "duplicate domain name 'code'" in message
    assert "missing_text_document.bin" in message and "valid_fraction 1.5" in message
    assert "tokenizer has 100 tokens" in message  # ids up to ~399 in a 100-token vocabulary
    with pytest.raises(DataConfigError, match="no such file"):
        load_domain_registry(two_domains / "nope.yaml")
    with pytest.raises(DataConfigError, match="alternate"):
        registry_from_data_path(["0.5", "a", "0.5"])
