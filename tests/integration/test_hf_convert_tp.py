"""A converted HF checkpoint (written at TP1) loads at TP=2 and gives transformers' logits.

The embedding/output rows are padded to 384 at TP1 but to 512 at TP2: the extra rows must load as
zeros (zero logits), and the true columns must match transformers within 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import SCRIPTS, read_json, torchrun
from tests.unit.test_hf_convert import CASES, VOCAB, random_hf_model, to_megatron, tokens

TP_CASES = ("qwen2_qkv_bias", "qwen3_qk_norm_tied")  # GQA with 2 groups, one per TP rank; bias; q/k norm; tied


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tp")
    pairs = []
    for name in TP_CASES:
        family, overrides, _, _ = CASES[name]
        model = random_hf_model(family, overrides, seed=3)
        model.save_pretrained(root / name, safe_serialization=True)
        # in-process: the converter starts (and ends) its own world of one
        assert to_megatron.main(["--hf-dir", str(root / name), "--save", str(root / f"{name}_ckpt")]) == 0
        ids, _ = tokens()
        with torch.no_grad():
            torch.save({"tokens": ids, "logits": model(ids).logits}, root / f"{name}_ref.pt")
        pairs += [root / f"{name}_ckpt", root / f"{name}_ref.pt"]
    torchrun(SCRIPTS / "hf_logits_tp.py", 2, root / "out.json", *pairs, timeout=300)
    return read_json(root / "out.json")


def test_tp2_logits_match_transformers(records):
    assert len(records) == len(TP_CASES)
    for record in records:
        assert record["local_columns"] == 256 and record["padded_columns"] == 512, record
        assert record["max_abs_diff"] <= 1e-4, record
        assert record["padding_max_abs"] == 0.0, record  # rows 300..511 are zero, none left unset (NaN)
        assert record["ranks_agree"], record
    assert VOCAB == 300
