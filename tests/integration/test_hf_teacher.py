"""A Hugging Face teacher end to end: its tokenizer.json tokenizes the data, the converted checkpoint is
the --teacher-load of a short KD run (no download: a tiny random Llama made here)."""

from __future__ import annotations

import json

import pytest

from tests.corpus import corpus_texts, hf_teacher_workspace
from tests.runs import pretrain

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_teacher(tiny_corpus, tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hf_teacher")
    corpus, names, texts = corpus_texts(tiny_corpus)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    )
    hf_dir = root / "hf"
    hf_dir.mkdir()
    tokenizer.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=2,
        bos_token_id=1,
        tie_word_embeddings=False,
    )
    import torch

    torch.manual_seed(0)
    registry = hf_teacher_workspace(root, hf_dir, LlamaForCausalLM(config), corpus, names)
    return {"hf_dir": hf_dir, "teacher": root / "teacher", "registry": registry, "root": root}


def test_converted_teacher_drives_a_kd_run(hf_teacher):
    run = pretrain(
        1,
        "--ddk-mode",
        "kd",
        "--teacher-load",
        hf_teacher["teacher"],
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        hf_teacher["hf_dir"],
        "--domains",
        hf_teacher["registry"],
        "--data-cache-path",
        hf_teacher["root"] / "cache",
        "--num-layers",
        "2",
        "--hidden-size",
        "32",
        "--num-attention-heads",
        "4",
        "--ffn-hidden-size",
        "64",
        "--swiglu",
        "--disable-bias-linear",
        "--untie-embeddings-and-output-weights",
        "--seq-length",
        "32",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--train-iters",
        "3",
        "--log-interval",
        "1",
        "--ddk-val-samples",
        "4",
        "--lr",
        "1e-3",
    )
    assert sorted(run.metrics) == [1, 2, 3]
    for values in run.metrics.values():
        assert values["kd loss"] > 0 and values["teacher lm loss"] > 0
    # a random-init teacher: its loss is about log(vocab)
    assert abs(run.metrics[1]["teacher lm loss"] - 6.0) < 1.0


def test_teacher_with_another_tokenizer_is_refused(hf_teacher, tiny_corpus):
    run = pretrain(
        1,
        "--ddk-mode",
        "kd",
        "--teacher-load",
        hf_teacher["teacher"],
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        tiny_corpus["tokenizer"],
        "--domains",
        tiny_corpus["registry"],
        "--num-layers",
        "2",
        "--hidden-size",
        "32",
        "--num-attention-heads",
        "4",
        "--seq-length",
        "32",
        "--micro-batch-size",
        "2",
        "--train-iters",
        "1",
        check=False,
    )
    assert run.returncode != 0 and "share a vocabulary" in run.stderr
