"""A Llama-3-style teacher end to end: its own tokenizer.json (byte-level BPE with Llama 3's special tokens,
an instruct config naming <|eot_id|>), Llama 3.x RoPE scaling and tied embeddings; the converted checkpoint
drives a DDK run of a student with the same RoPE scaling, which is then exported back to transformers."""

from __future__ import annotations

import json

import pytest
import torch

from tests.corpus import corpus_texts, hf_teacher_workspace, write_llama3_tokenizer
from tests.helpers import python
from tests.runs import pretrain

pytestmark = pytest.mark.slow

ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}  # short, so the 32-token sequences reach the scaled band


@pytest.fixture(scope="module")
def llama3_teacher(tiny_corpus, tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama3_teacher")
    corpus, names, texts = corpus_texts(tiny_corpus)
    hf_dir = root / "hf"
    raw = write_llama3_tokenizer(hf_dir, texts, instruct=True)
    eot, end = raw.token_to_id("<|eot_id|>"), raw.token_to_id("<|end_of_text|>")
    config = LlamaConfig(
        vocab_size=raw.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=64,
        rope_theta=500000.0,
        rope_scaling=ROPE,
        tie_word_embeddings=True,
        bos_token_id=end - 1,
        eos_token_id=[end, eot],
    )
    torch.manual_seed(0)
    registry = hf_teacher_workspace(root, hf_dir, LlamaForCausalLM(config), corpus, names)
    return {
        "hf_dir": hf_dir,
        "teacher": root / "teacher",
        "registry": registry,
        "root": root,
        "eod": end,
        "data": registry.parent,
        "names": names,
    }


def test_documents_end_with_end_of_text(llama3_teacher):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(llama3_teacher["data"] / f"{llama3_teacher['names'][0]}_text_document"))
    ends = {int(dataset[i][-1]) for i in range(min(len(dataset), 20))}
    assert ends == {llama3_teacher["eod"]}  # not <|eot_id|>, which the instruct config names as eos


def test_llama3_teacher_drives_a_ddk_run_and_the_student_exports(llama3_teacher):
    root = llama3_teacher["root"]
    run = pretrain(
        1,
        "--ddk-mode",
        "ddk",
        "--teacher-load",
        llama3_teacher["teacher"],
        "--ddk-interval",
        "2",
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        llama3_teacher["hf_dir"],
        "--domains",
        llama3_teacher["registry"],
        "--data-cache-path",
        root / "cache",
        "--num-layers",
        "2",
        "--hidden-size",
        "32",
        "--num-attention-heads",
        "4",
        "--num-query-groups",
        "1",
        "--ffn-hidden-size",
        "64",
        "--swiglu",
        "--disable-bias-linear",
        "--seq-length",
        "32",
        "--max-position-embeddings",
        "64",
        "--rotary-base",
        "500000",
        "--use-rope-scaling",
        "--rope-scaling-factor",
        "32",
        "--rope-scaling-original-max-position-embeddings",
        "16",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--train-iters",
        "4",
        "--log-interval",
        "1",
        "--ddk-val-samples",
        "4",
        "--lr",
        "1e-3",
        "--save",
        root / "student",
    )
    assert sorted(run.metrics) == [1, 2, 3, 4]
    assert all(m["kd loss"] > 0 and m["teacher lm loss"] > 0 for m in run.metrics.values())
    log = [json.loads(line) for line in (root / "student" / "ddk_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [0, 2] and "DDK update at iteration 2" in run.stdout

    from transformers import AutoModelForCausalLM

    python(
        "tools/convert_megatron_to_hf.py",
        "--load",
        root / "student",
        "--output-dir",
        root / "student_hf",
        "--tokenizer-dir",
        llama3_teacher["hf_dir"],
    )
    student, info = AutoModelForCausalLM.from_pretrained(root / "student_hf", output_loading_info=True)
    assert not any(info.values()) and student.config.rope_scaling == {**ROPE, "factor": 32.0}
    # generation stops where the copied (instruct) tokenizer says: its eos_token, <|eot_id|>
    assert student.config.tie_word_embeddings and student.config.eos_token_id == llama3_teacher["eod"] + 8
