"""A converted HF checkpoint (written at TP1/EP1) loads at TP=2 (every family) and at EP=2 (MoE) and gives
transformers' logits.

The embedding/output rows are padded to 384 at TP1 but to 512 at TP2: the extra rows must load as
zeros (zero logits), and the true columns must match transformers within 1e-4. At EP=2 each rank holds
half of the experts and routes tokens to the other rank's experts through the token dispatcher.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import SCRIPTS, read_json, torchrun
from tests.unit.test_hf_convert import CASES, MOE_CASES, VOCAB, random_hf_model, to_megatron, tokens

# GQA with 2 groups (one per TP rank), bias, q/k norm, tied, Llama 3.x RoPE, explicit head_dim, and the MoE families
TP_CASES = ("qwen2_qkv_bias", "qwen3_qk_norm_tied", "llama31_rope_scaling", "mistral_head_dim", *MOE_CASES)


@pytest.fixture(scope="module")
def converted_pairs(tmp_path_factory):
    """name -> [checkpoint, reference logits] for every case of TP_CASES."""
    root = tmp_path_factory.mktemp("hf_tp")
    pairs = {}
    for name in TP_CASES:
        family, overrides, _, _ = CASES[name]
        model = random_hf_model(family, overrides, seed=3)
        model.save_pretrained(root / name, safe_serialization=True)
        # in-process: the converter starts (and ends) its own world of one
        assert to_megatron.main(["--hf-dir", str(root / name), "--save", str(root / f"{name}_ckpt")]) == 0
        ids, _ = tokens()
        with torch.no_grad():
            torch.save({"tokens": ids, "logits": model(ids).logits}, root / f"{name}_ref.pt")
        pairs[name] = [root / f"{name}_ckpt", root / f"{name}_ref.pt"]
    return root, pairs


def run_layout(converted_pairs, tp: int, ep: int, names) -> list[dict]:
    root, pairs = converted_pairs
    out = root / f"out_tp{tp}_ep{ep}.json"
    torchrun(SCRIPTS / "hf_logits_tp.py", 2, out, tp, ep, *(p for n in names for p in pairs[n]), timeout=300)
    return read_json(out)


def test_tp2_logits_match_transformers(converted_pairs):
    records = run_layout(converted_pairs, 2, 1, TP_CASES)
    assert len(records) == len(TP_CASES)
    for record in records:
        assert record["local_columns"] == 256 and record["padded_columns"] == 512, record
        assert record["max_abs_diff"] <= 1e-4, record
        assert record["padding_max_abs"] == 0.0, record  # rows 300..511 are zero, none left unset (NaN)
        assert record["ranks_agree"], record
    assert VOCAB == 300


def test_ep2_moe_logits_match_transformers(converted_pairs):
    records = run_layout(converted_pairs, 1, 2, MOE_CASES)
    assert len(records) == len(MOE_CASES)
    for record in records:
        assert record["local_columns"] == record["padded_columns"] == 384, record
        assert record["max_abs_diff"] <= 1e-4, record
        assert record["padding_max_abs"] == 0.0 and record["ranks_agree"], record
