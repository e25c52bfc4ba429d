"""A tiny multi-domain corpus built once per test session with the project's own tools."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.helpers import python

LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
)
"""Llama 3.1's first special tokens, in its order (ids 128000..128009 there, right after the BPE merges)."""


def write_llama3_tokenizer(
    directory: Path, texts: list[str], *, vocab_size: int = 400, instruct: bool = False
):
    """A Llama-3-style tokenizer.json: byte-level BPE, then the special tokens, a <|begin_of_text|> template;
    tokenizer_config.json names <|end_of_text|> as eos (base model) or <|eot_id|> (instruct model)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL_TOKENS])
    raw.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        special_tokens=[("<|begin_of_text|>", raw.token_to_id("<|begin_of_text|>"))],
    )
    directory.mkdir(parents=True, exist_ok=True)
    raw.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>" if instruct else "<|end_of_text|>",
                "model_max_length": 131072,
            }
        )
    )
    return raw


def build_tiny_corpus(root: Path, *, size_mb: float = 0.4, vocab_size: int = 512) -> dict[str, Path]:
    """Demo corpus -> SentencePiece tokenizer -> one indexed dataset per domain -> registry."""
    corpus = root / "corpus"
    python("tools/make_demo_corpus.py", "--output-dir", corpus, "--size-mb", str(size_mb), "--seed", "7")
    registry = corpus / "domains.yaml"
    names = [d["name"] for d in yaml.safe_load(registry.read_text())["domains"]]
    python(
        "tools/train_tokenizer.py",
        "--input",
        *[corpus / f"{n}.jsonl" for n in names],
        "--output-prefix",
        root / "tokenizer",
        "--vocab-size",
        str(vocab_size),
        "--model-type",
        "bpe",
    )
    for name in names:
        python(
            "tools/preprocess_data.py",
            "--input",
            corpus / f"{name}.jsonl",
            "--output-prefix",
            corpus / name,
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            root / "tokenizer.model",
            "--append-eod",
            "--workers",
            "1",
        )
    return {
        "registry": registry,
        "tokenizer": root / "tokenizer.model",
        "root": root,
        "names": json.dumps(names),
    }


def corpus_texts(corpus: dict) -> tuple[Path, list[str], list[str]]:
    """The tiny corpus's directory, domain names and every document's text (to train a tokenizer on)."""
    directory = corpus["registry"].parent
    names = json.loads(corpus["names"])
    texts = [
        json.loads(line)["text"]
        for n in names
        for line in (directory / f"{n}.jsonl").read_text().splitlines()
    ]
    return directory, names, texts


def hf_teacher_workspace(root: Path, hf_dir: Path, model, corpus_dir: Path, names: list[str]) -> Path:
    """Save a (tiny, random) transformers ``model`` into ``hf_dir`` beside its tokenizer, convert it to
    ``root/teacher`` and tokenize the corpus with that tokenizer into ``root/data``; returns the registry."""
    model.save_pretrained(hf_dir, safe_serialization=True)
    python("tools/convert_hf_to_megatron.py", "--hf-dir", hf_dir, "--save", root / "teacher", "--fp32")
    data = root / "data"
    data.mkdir()
    for name in names:
        python(
            "tools/preprocess_data.py",
            "--input",
            corpus_dir / f"{name}.jsonl",
            "--output-prefix",
            data / name,
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            hf_dir,
            "--append-eod",
            "--no-progress",
        )
    registry = data / "domains.yaml"
    registry.write_text(
        yaml.safe_dump(
            {"domains": [{"name": n, "train": f"{n}_text_document", "valid_fraction": 0.05} for n in names]}
        )
    )
    return registry
