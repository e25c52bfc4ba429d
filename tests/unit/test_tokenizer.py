"""Tokenizers: SentencePiece (trained by tools/train_tokenizer.py) and Hugging Face tokenizer.json files.

Hugging Face ids are compared with what ``transformers`` produces for the same file.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

import pytest
from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

from megatron_ddk.data.tokenizer import (
    TOKENIZER_TYPES,
    build_tokenizer,
    padded_vocab_size,
    tokenizer_identity,
)
from tests.helpers import python, train_sentencepiece

DOCS = [
    "def f(x):\n    return x  +  1\n",
    "The quick brown fox jumps over the lazy dog.",
    "12 + 30 = 42",
    '{"id": 7, "ok": true}',
    "ünïcödé text ✓\ttab",
    "  indented\n\n\nblank lines  ",
]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    corpus = write_jsonl(root / "docs.jsonl", DOCS * 8)
    out = train_sentencepiece(corpus, root / "tok", vocab_size=400)
    assert "vocab_size=400" in out.stdout and "48 documents" in out.stdout
    return root / "tok.model"


def test_sentencepiece_ids_and_lossless_round_trip(spm):
    tok = build_tokenizer("SentencePieceTokenizer", spm)
    assert isinstance(tok, MegatronLegacyTokenizer)
    assert (tok.vocab_size, tok.eod, tok.pad) == (400, 2, 3)
    assert tok.vocab["</s>"] == 2 and tok.inv_vocab[3] == "<pad>" and len(tok.vocab) == 400
    for text in DOCS + ["unseen 漢字 ☃"]:  # newlines, runs of spaces, tabs and byte fallback survive
        ids = tok.tokenize(text)
        assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
        assert tok.detokenize(ids) == text
    assert tok.tokenize("") == []


def test_identity_hashes_the_file(spm, tmp_path):
    tok = build_tokenizer("SentencePieceTokenizer", spm)
    digest = hashlib.sha256(spm.read_bytes()).hexdigest()
    assert tokenizer_identity(tok) == {
        "type": "SentencePieceTokenizer",
        "vocab_size": 400,
        "sha256": digest,
        "eod": 2,
    }
    assert isinstance(tok.unique_identifiers, OrderedDict) and tok.unique_identifiers["sha256"] == digest
    # the cache key follows the content, not the location
    moved = tmp_path / "elsewhere.model"
    moved.write_bytes(spm.read_bytes())
    assert build_tokenizer("SentencePieceTokenizer", moved).unique_identifiers == tok.unique_identifiers


def test_train_tokenizer_sampling_is_reproducible(tmp_path):
    corpus = write_jsonl(tmp_path / "a.jsonl", [f"{d} {i}" for i in range(30) for d in DOCS])
    args = [
        "tools/train_tokenizer.py",
        "--input",
        str(tmp_path / "*.jsonl"),
        "--vocab-size",
        "320",
        "--num-threads",
        "1",
        "--max-sentences",
        "60",
        "--seed",
        "3",
    ]
    first = python(*args, "--output-prefix", tmp_path / "one")
    python(*args, "--output-prefix", tmp_path / "two")
    assert (tmp_path / "one.model").read_bytes() == (tmp_path / "two.model").read_bytes()
    documents = int(first.stdout.split(" documents")[0].rsplit(" ", 1)[1])
    assert 30 <= documents <= 100  # about 60 of the 180
    assert corpus.exists() and not list(tmp_path.glob(".*"))  # no temporary files left


def test_train_tokenizer_errors(tmp_path):
    failed = python(
        "tools/train_tokenizer.py",
        "--input",
        tmp_path / "nope.jsonl",
        "--output-prefix",
        tmp_path / "t",
        "--vocab-size",
        "100",
        check=False,
    )
    assert failed.returncode == 2
    assert "no such file(s)" in failed.stderr and "--vocab-size 100" in failed.stderr
    corpus = write_jsonl(tmp_path / "small.jsonl", ["tiny corpus"])
    failed = python(
        "tools/train_tokenizer.py",
        "--input",
        corpus,
        "--output-prefix",
        tmp_path / "t",
        "--vocab-size",
        "5000",
        "--num-threads",
        "1",
        check=False,
    )
    assert failed.returncode == 2 and "error:" in failed.stderr and not (tmp_path / "t.model").exists()


def train_hf(tmp_path, *, specials=("<unk>", "</s>", "<pad>", "<s>"), template=True, truncate=True):
    """A tiny byte-level BPE tokenizer.json with a BOS template and truncation switched on in the file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    raw = Tokenizer(models.BPE(unk_token=specials[0]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # as Qwen / Llama-3 files
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        DOCS * 4,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=list(specials),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    if template:
        raw.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", raw.token_to_id("<s>"))]
        )
    if truncate:
        raw.enable_truncation(max_length=4)
    tmp_path.mkdir(parents=True, exist_ok=True)
    raw.save(str(tmp_path / "tokenizer.json"))
    return raw


def test_huggingface_ids_match_transformers(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    raw = train_hf(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "</s>",
                "pad_token": {
                    "__type": "AddedToken",
                    "content": "<pad>",
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                },
            }
        )
    )
    tok = build_tokenizer("HuggingFaceTokenizer", tmp_path)
    references = [
        PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json")),
        AutoTokenizer.from_pretrained(str(tmp_path)),
    ]
    for text in DOCS:
        ids = tok.tokenize(text)
        assert len(ids) > 4  # the truncation saved in the file is not applied, nor the <s> template
        for reference in references:
            assert ids == reference(text, add_special_tokens=False)["input_ids"]
        assert tok.detokenize(ids) == text
    assert (tok.eod, tok.pad) == (raw.token_to_id("</s>"), raw.token_to_id("<pad>"))
    assert tok.vocab_size == raw.get_vocab_size() == len(references[1])
    # a path to the tokenizer.json itself works too and is the same tokenizer
    same = build_tokenizer("HuggingFaceTokenizer", tmp_path / "tokenizer.json")
    assert tokenizer_identity(same) == tokenizer_identity(tok)
    assert (
        tokenizer_identity(tok)["sha256"]
        == hashlib.sha256((tmp_path / "tokenizer.json").read_bytes()).hexdigest()
    )


def test_huggingface_eod_and_pad_rules(tmp_path):
    # special_tokens_map.json is read when tokenizer_config.json is absent; no pad -> pad = eod
    raw = train_hf(tmp_path / "a", specials=("<unk>", "<eos>", "<|endoftext|>"), template=False)
    (tmp_path / "a" / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<eos>"}))
    tok = build_tokenizer("HuggingFaceTokenizer", tmp_path / "a")
    assert tok.eod == tok.pad == raw.token_to_id("<eos>")
    # nothing named: the first common end token found in the vocabulary
    (tmp_path / "a" / "special_tokens_map.json").unlink()
    assert build_tokenizer("HuggingFaceTokenizer", tmp_path / "a").eod == raw.token_to_id("<|endoftext|>")
    train_hf(tmp_path / "b", specials=("<unk>", "<sep>"), template=False)
    with pytest.raises(ValueError, match="no end-of-document token.*add eos_token"):
        build_tokenizer("HuggingFaceTokenizer", tmp_path / "b")
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<end>"}))
    with pytest.raises(ValueError, match="eos_token '<end>'.*not in its vocabulary"):
        build_tokenizer("HuggingFaceTokenizer", tmp_path / "b")


@pytest.mark.parametrize(
    "kind,model,needle",
    [
        ("GPT2BPETokenizer", "x", "--tokenizer-type 'GPT2BPETokenizer' is not supported"),
        (
            "SentencePieceTokenizer",
            "/nonexistent.model",
            "--tokenizer-model /nonexistent.model: no such file",
        ),
        ("SentencePieceTokenizer", "/tmp", "is a directory"),
        ("HuggingFaceTokenizer", "", "--tokenizer-model is required"),
    ],
)
def test_build_tokenizer_errors(kind, model, needle):
    with pytest.raises((ValueError, FileNotFoundError), match=needle):
        build_tokenizer(kind, model)


def test_unreadable_tokenizer_files(tmp_path):
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        build_tokenizer("SentencePieceTokenizer", tmp_path / "bad.model")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json there"):
        build_tokenizer("HuggingFaceTokenizer", tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", tmp_path)
    assert TOKENIZER_TYPES == ("SentencePieceTokenizer", "HuggingFaceTokenizer")


def test_padded_vocab_size_follows_megatron():
    assert padded_vocab_size(32000, 1) == 32000
    assert padded_vocab_size(50257, 1) == 50304
    assert padded_vocab_size(151646, 1) == 151680
    assert padded_vocab_size(151646, 8) == 152576  # multiple of 128 * 8
    assert padded_vocab_size(500, 2, 128) == 512
    assert padded_vocab_size(500, 1, 64) == 512 and padded_vocab_size(513, 1, 1) == 513
    with pytest.raises(ValueError, match="must be >= 1"):
        padded_vocab_size(0, 1)


@pytest.mark.parametrize("instruct", [False, True], ids=["base", "instruct"])
def test_llama3_tokenizer_ends_documents_with_end_of_text(tmp_path, instruct):
    """Byte-level BPE with Llama 3's special tokens after the merges: ids match transformers, no
    <|begin_of_text|> is added, and EOD is <|end_of_text|> even when an instruct model names <|eot_id|>."""
    from transformers import AutoTokenizer

    from tests.corpus import write_llama3_tokenizer

    raw = write_llama3_tokenizer(tmp_path, DOCS * 4, vocab_size=300, instruct=instruct)
    tok = build_tokenizer("HuggingFaceTokenizer", tmp_path)
    reference = AutoTokenizer.from_pretrained(str(tmp_path))
    end_of_text = raw.token_to_id("<|end_of_text|>")
    assert (
        end_of_text == raw.token_to_id("<|begin_of_text|>") + 1
        and raw.token_to_id("<|eot_id|>") == end_of_text + 8
    )
    assert tok.eod == tok.pad == end_of_text and tok.vocab_size == len(reference)
    assert reference.eos_token == ("<|eot_id|>" if instruct else "<|end_of_text|>")
    for text in DOCS:
        assert tok.tokenize(text) == reference(text, add_special_tokens=False)["input_ids"]
        assert reference(text)["input_ids"][0] == raw.token_to_id("<|begin_of_text|>")  # HF's own template
    assert tok.tokenize("a<|eot_id|>b")[1] == end_of_text + 8  # special tokens stay single ids
