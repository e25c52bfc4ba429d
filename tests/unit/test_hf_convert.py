"""HF <-> megatron-ddk converters: tiny random LLaMA (3.x RoPE scaling) / Mistral / Qwen2 / Qwen3 and
Mixtral / Qwen2-MoE / Qwen3-MoE models built here (no download).

Each HF model is converted, loaded into our GPTModel at TP1 and must give transformers' logits; it is
then exported back and must give the original tensors, bit for bit, and the same logits. Bad inputs
must fail with a message that names the field, file or tensor. Logits are [b, s, v].
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from megatron_ddk.models.hf_mapping import HFConversionError, hf_placements, model_config_from_hf
from megatron_ddk.platform.distributed import ParallelLayout, destroy, initialize, set_seed
from tests.helpers import REPO_ROOT, python

sys.path.insert(0, str(REPO_ROOT / "tools"))
import convert_hf_to_megatron as to_megatron  # noqa: E402
import convert_megatron_to_hf as to_hf  # noqa: E402

VOCAB, SEQ = 300, 16
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    rope_theta=50000.0,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
QWEN_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True}
CASES = {
    # name: (family, config overrides, save_pretrained max_shard_size, with a tokenizer.json)
    "llama_gqa_sharded": ("llama", {}, "20KB", False),
    "qwen2_qkv_bias": ("qwen2", {}, None, True),
    "qwen3_qk_norm_tied": ("qwen3", {"head_dim": 24, "tie_word_embeddings": True}, None, False),
    # Llama 3.1 values except a short original context, so our own scaling path runs (megatron fixes 8192)
    "llama31_rope_scaling": (
        "llama",
        {"rope_scaling": dict(LLAMA3_ROPE, original_max_position_embeddings=32)},
        None,
        False,
    ),
    # Llama 3.2: factor 32 with megatron-core's fixed frequency factors; tied embeddings, 4:1 GQA
    "llama32_rope_tied": (
        "llama",
        {
            "rope_scaling": dict(LLAMA3_ROPE, factor=32.0),
            "tie_word_embeddings": True,
            "num_key_value_heads": 1,
        },
        None,
        False,
    ),
    "mistral_head_dim": ("mistral", {"head_dim": 32, "sliding_window": None}, None, False),
    "mixtral_top2": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, None, False),
    "qwen3_moe_top2_unnormalised": (
        "qwen3_moe",
        {**QWEN_MOE, "norm_topk_prob": False, "head_dim": 24},
        None,
        False,
    ),
    "qwen2_moe_shared_top1": (
        "qwen2_moe",
        {
            **QWEN_MOE,
            "num_experts_per_tok": 1,
            "norm_topk_prob": False,
            "shared_expert_intermediate_size": 48,
        },
        None,
        False,
    ),
}
MOE_CASES = ("mixtral_top2", "qwen3_moe_top2_unnormalised", "qwen2_moe_shared_top1")


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    pg = initialize(ParallelLayout(world_size=1))
    set_seed(1234, pg)
    yield
    destroy()


def hf_classes(family: str):
    import transformers

    return {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    }[family]


def random_hf_model(family: str, overrides: dict, seed: int = 0):
    """Every parameter random (norms around 1, biases non-zero), so each mapping shows in the logits."""
    config_cls, model_cls = hf_classes(family)
    kwargs = {"tie_word_embeddings": False, **BASE, **overrides}
    model = model_cls(config_cls(**kwargs)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model


def write_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(40))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def tokens() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))  # [b, s]
    return ids, torch.arange(SEQ).expand(2, SEQ)


def world_groups():
    """The one-process world's groups (``initialize`` is idempotent and returns them)."""
    return initialize(ParallelLayout(world_size=1))


def padded_rows(model) -> int:
    from megatron_ddk.data.tokenizer import padded_vocab_size

    return padded_vocab_size(model.vocab_size, 1, model.make_vocab_size_divisible_by)


def load_ours(ckpt: Path):
    from megatron_ddk.checkpointing import load_model_state, read_metadata
    from megatron_ddk.config import ParallelConfig, PrecisionConfig
    from megatron_ddk.models.gpt import build_gpt_model

    meta = read_metadata(ckpt)
    model = build_gpt_model(
        meta.model,
        ParallelConfig(),
        PrecisionConfig(),
        pre_process=True,
        post_process=True,
        padded_vocab_size=padded_rows(meta.model),
        pg=world_groups(),
        initialize_weights=False,
    )
    load_model_state(ckpt, model)
    return model.eval(), meta


def failure(tool, argv: list[str], capsys) -> str:
    assert tool.main([str(a) for a in argv]) == 1
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (hf model, hf dir, checkpoint root); each case converted once, on first use."""
    root = tmp_path_factory.mktemp("hf")
    done: dict = {}

    def get(name: str):
        if name not in done:
            family, overrides, shard, with_tokenizer = CASES[name]
            model = random_hf_model(family, overrides)
            hf_dir = root / name
            model.save_pretrained(
                hf_dir, safe_serialization=True, **({"max_shard_size": shard} if shard else {})
            )
            if with_tokenizer:
                write_tokenizer(hf_dir)
            assert to_megatron.main(["--hf-dir", str(hf_dir), "--save", str(root / f"{name}_ckpt")]) == 0
            done[name] = (model, hf_dir, root / f"{name}_ckpt")
        return done[name]

    return get


# -------------------------------------------------------------------------------------- HF -> ours


@pytest.mark.parametrize("name", sorted(CASES))
def test_converted_model_gives_transformers_logits(name, converted):
    hf_model, hf_dir, ckpt = converted(name)
    ours, meta = load_ours(ckpt)
    ids, positions = tokens()
    with torch.no_grad():
        reference = hf_model(ids).logits  # [b, s, V]
        logits = ours(ids, positions, None)  # [b, s, Vp]
    assert logits.shape == (2, SEQ, 384)  # 300 rows padded to a multiple of 128
    assert (logits[..., :VOCAB] - reference).abs().max().item() <= 1e-4
    assert torch.all(logits[..., VOCAB:] == 0)  # zero padding rows -> zero logits
    assert meta.ddk_mode == "hf-import" and meta.iteration == 0 and meta.tensor_model_parallel_size == 1
    cfg, overrides = meta.model, CASES[name][1]
    groups = overrides.get("num_key_value_heads", 2)
    assert (cfg.query_groups, cfg.vocab_size, cfg.rotary_base, cfg.norm_epsilon) == (
        groups,
        VOCAB,
        50000.0,
        1e-6,
    )
    assert cfg.add_qkv_bias == name.startswith("qwen2") and cfg.qk_layernorm == name.startswith("qwen3")
    assert cfg.untie_embeddings_and_output_weights == ("tied" not in name)
    assert cfg.kv_channels == overrides.get("head_dim")
    assert cfg.use_rope_scaling == ("rope_scaling" in overrides)
    if cfg.use_rope_scaling:
        rope = overrides["rope_scaling"]
        assert (cfg.rope_scaling_factor, cfg.rope_scaling_original_max_position_embeddings) == (
            rope["factor"],
            rope["original_max_position_embeddings"],
        )
    assert cfg.is_moe == (name in MOE_CASES)


def test_sharded_input_is_read_through_its_index(converted):
    _, hf_dir, _ = converted("llama_gqa_sharded")
    assert (hf_dir / "model.safetensors.index.json").exists() and len(
        list(hf_dir.glob("model-*.safetensors"))
    ) > 3


def test_tokenizer_identity_is_recorded(converted):
    from megatron_ddk.checkpointing import read_metadata
    from megatron_ddk.data.tokenizer import build_tokenizer, tokenizer_identity

    _, hf_dir, ckpt = converted("qwen2_qkv_bias")
    assert read_metadata(ckpt).tokenizer == tokenizer_identity(
        build_tokenizer("HuggingFaceTokenizer", hf_dir)
    )
    _, _, untokenized = converted("llama_gqa_sharded")
    assert read_metadata(untokenized).tokenizer == {"type": None, "vocab_size": VOCAB, "sha256": None}


def test_vocab_size_from_tokenizer_keeps_only_the_tokenizer_rows(converted, tmp_path, capsys):
    hf_model, hf_dir, _ = converted("qwen2_qkv_bias")
    capsys.readouterr()
    assert (
        to_megatron.main(
            ["--hf-dir", str(hf_dir), "--save", str(tmp_path / "ckpt"), "--vocab-size-from-tokenizer"]
        )
        == 0
    )
    assert "vocab 43," in capsys.readouterr().out  # 43 tokens in tokenizer.json, 300 rows in the HF model
    ours, meta = load_ours(tmp_path / "ckpt")
    assert meta.model.vocab_size == 43 == meta.tokenizer["vocab_size"]
    ids = torch.randint(0, 43, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = ours(ids, torch.arange(SEQ).expand(2, SEQ), None)  # [b, s, 128]
        reference = hf_model(ids).logits[..., :43]
    assert logits.shape[-1] == 128 and (logits[..., :43] - reference).abs().max().item() <= 1e-4
    assert torch.all(logits[..., 43:] == 0)
    assert to_hf.main(["--load", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "hf")]) == 0
    back = hf_classes("qwen2")[1].from_pretrained(tmp_path / "hf")
    assert back.config.vocab_size == 43
    assert torch.equal(back.lm_head.weight, hf_model.lm_head.weight[:43])


def test_bf16_conversion_stores_bf16(converted, tmp_path):
    from megatron.core import dist_checkpointing

    from megatron_ddk.checkpointing import resolve_checkpoint

    hf_model, hf_dir, _ = converted("qwen2_qkv_bias")
    assert to_megatron.main(["--hf-dir", str(hf_dir), "--save", str(tmp_path / "ckpt"), "--bf16"]) == 0
    stored = dist_checkpointing.load_tensors_metadata(
        str(resolve_checkpoint(tmp_path / "ckpt", flag="--load"))
    )
    assert stored["embedding.word_embeddings.weight"].dtype == torch.bfloat16
    assert to_hf.main(["--load", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "hf")]) == 0
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    original = hf_model.state_dict()
    assert all(exported[k].dtype == torch.bfloat16 for k in exported)
    assert all(torch.equal(exported[k], original[k].to(torch.bfloat16)) for k in original)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


# ------------------------------------------------------------------------------------- ours -> HF


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_gives_identical_tensors_and_logits(name, converted, tmp_path):
    hf_model, hf_dir, ckpt = converted(name)
    family = CASES[name][0]
    out = tmp_path / "exported"
    argv = ["--load", str(ckpt), "--output-dir", str(out)]
    if "sharded" in name:
        argv += ["--max-shard-size", "30KB"]
    if family == "mistral":  # without a sliding window, Mistral's HF form is LLaMA's: ask for it by name
        argv += ["--architecture", "MistralForCausalLM"]
    if CASES[name][3]:
        argv += ["--tokenizer-dir", str(hf_dir)]
    assert to_hf.main(argv) == 0
    back, info = hf_classes(family)[1].from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    assert back.config.architectures == hf_model.config.architectures
    assert getattr(back.config, "rope_scaling", None) == getattr(hf_model.config, "rope_scaling", None)
    original, restored = hf_model.state_dict(), back.state_dict()
    assert sorted(original) == sorted(restored)
    assert all(torch.equal(original[k], restored[k]) for k in original)
    ids, _ = tokens()
    with torch.no_grad():
        assert torch.equal(back.eval()(ids).logits, hf_model(ids).logits)
    if "sharded" in name:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) > 1 and all((out / f).is_file() for f in files)
        assert all((out / f).stat().st_size < 100_000 for f in files)  # 30KB shards, the 77KB embedding alone
    if "tied" in name:
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
            assert "lm_head.weight" not in handle.keys() and back.config.tie_word_embeddings


def test_export_copies_the_tokenizer_and_sets_its_ids(converted, tmp_path):
    from transformers import AutoTokenizer

    _, hf_dir, ckpt = converted("qwen2_qkv_bias")
    assert (
        to_hf.main(
            ["--load", str(ckpt), "--output-dir", str(tmp_path / "out"), "--tokenizer-dir", str(hf_dir)]
        )
        == 0
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["architectures"]) == (
        1,
        2,
        ["Qwen2ForCausalLM"],
    )
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("w3 w7")["input_ids"] == [6, 10]


@pytest.mark.parametrize(
    "architecture, extra",
    [
        ("Qwen2ForCausalLM", {}),
        (
            "Qwen2MoeForCausalLM",
            {**QWEN_MOE, "shared_expert_intermediate_size": 48, "moe_intermediate_size": 40},
        ),
        ("MixtralForCausalLM", {"num_local_experts": 3, "num_experts_per_tok": 2}),
    ],
)
def test_placements_cover_each_megatron_parameter_exactly_once(architecture, extra):
    """Every element of every parameter is written by exactly one HF tensor, except the padding rows (never)."""
    from megatron_ddk.config import ParallelConfig, PrecisionConfig
    from megatron_ddk.models.gpt import build_gpt_model
    from megatron_ddk.models.hf_mapping import MODEL_TYPES, vocab_padding_rows

    values = {
        "architectures": [architecture],
        "model_type": MODEL_TYPES[architecture],
        "hidden_act": "silu",
        **BASE,
        "num_key_value_heads": 1,
        **extra,
    }  # multi-query: one group holding all 4 query heads
    cfg = model_config_from_hf(values)
    model = build_gpt_model(
        cfg,
        ParallelConfig(),
        PrecisionConfig(),
        pre_process=True,
        post_process=True,
        padded_vocab_size=padded_rows(cfg),
        pg=world_groups(),
        initialize_weights=False,
    )
    counts = {name: torch.zeros_like(param) for name, param in model.named_parameters()}
    for placement in hf_placements(cfg, architecture=architecture).values():
        placement.select(counts[placement.megatron_key]).add_(1)
    for rows in vocab_padding_rows(cfg, counts):
        rows.add_(1)
    assert all(torch.all(c == 1) for c in counts.values()), {k: c.unique() for k, c in counts.items()}


# ------------------------------------------------------------------------------------------ errors


def one_error_line(err: str) -> bool:
    """Our message is one line (transformers may log its own warnings before it)."""
    return len([line for line in err.splitlines() if line.startswith("error: ")]) == 1


def write_config(directory: Path, values: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(values))
    return directory


@pytest.mark.parametrize(
    "values, expected",
    [
        (
            {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
            "['GPT2LMHeadModel'] is not supported",
        ),
        (
            {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"},
            "['DeepseekV3ForCausalLM'] is not supported; supported: LlamaForCausalLM, MistralForCausalLM",
        ),
    ],
)
def test_refuses_unsupported_architectures(values, expected, tmp_path, capsys):
    hf_dir = write_config(tmp_path / "hf", values)
    assert expected in failure(to_megatron, ["--hf-dir", hf_dir, "--save", tmp_path / "out"], capsys)
    assert not (tmp_path / "out").exists()


def test_refuses_scaled_rope_and_other_options_in_one_message(tmp_path, capsys):
    values = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **BASE,
        "hidden_act": "gelu",
        "mlp_bias": True,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    }
    err = failure(
        to_megatron, ["--hf-dir", write_config(tmp_path / "hf", values), "--save", tmp_path / "o"], capsys
    )
    assert "rope_scaling=" in err and "'yarn' is not implemented" in err and "hidden_act='gelu'" in err
    assert "mlp_bias=True" in err and one_error_line(err)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "factor": 2.0},
        {"type": "linear", "factor": 2.0},
        {
            "rope_type": "longrope",
            "short_factor": [1.0] * 8,
            "long_factor": [1.0] * 8,
            "original_max_position_embeddings": 32,
        },
    ],
)
def test_refuses_each_unimplemented_rope_scaling_type(rope, tmp_path, capsys):
    values = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        **BASE,
        "rope_scaling": rope,
    }
    hf_dir = write_config(tmp_path / "hf", values)
    (hf_dir / "model.safetensors").write_bytes(b"not read")  # refused before any weight is opened
    err = failure(to_megatron, ["--hf-dir", hf_dir, "--save", tmp_path / "o"], capsys)
    kind = rope.get("rope_type") or rope["type"]
    assert f"RoPE scaling type {kind!r} is not implemented" in err and one_error_line(err)


@pytest.mark.parametrize(
    "architecture, model_type, extra, expected",
    [
        ("MistralForCausalLM", "mistral", {"sliding_window": 4096}, "sliding_window=4096"),
        ("MixtralForCausalLM", "mixtral", {"sliding_window": 32}, "sliding_window=32"),
        ("MixtralForCausalLM", "mixtral", {"router_jitter_noise": 0.01}, "router_jitter_noise=0.01"),
        (
            "MixtralForCausalLM",
            "mixtral",
            {"num_experts_per_tok": 1},
            "num_experts_per_tok=1 with top-1 routing",
        ),
        (
            "Qwen3MoeForCausalLM",
            "qwen3_moe",
            {**QWEN_MOE, "num_experts_per_tok": 1},
            "norm_topk_prob=True with top-1",
        ),
        ("Qwen3MoeForCausalLM", "qwen3_moe", {**QWEN_MOE, "mlp_only_layers": [1]}, "mlp_only_layers=[1]"),
        ("Qwen2MoeForCausalLM", "qwen2_moe", {**QWEN_MOE, "decoder_sparse_step": 2}, "decoder_sparse_step=2"),
        (
            "Qwen2MoeForCausalLM",
            "qwen2_moe",
            {**QWEN_MOE, "shared_expert_intermediate_size": 0},
            "shared_expert_intermediate_size=0",
        ),
    ],
)
def test_refuses_sliding_windows_and_inexact_routing(
    architecture, model_type, extra, expected, tmp_path, capsys
):
    values = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_act": "silu",
        **BASE,
        **extra,
    }
    hf_dir = write_config(tmp_path / "hf", values)
    (hf_dir / "model.safetensors").write_bytes(b"not read")
    err = failure(to_megatron, ["--hf-dir", hf_dir, "--save", tmp_path / "o"], capsys)
    assert expected in err and one_error_line(err) and not (tmp_path / "o").exists()


def test_refuses_sliding_window_qwen(tmp_path, capsys):
    values = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **BASE,
        "use_sliding_window": True,
        "sliding_window": 16,
        "max_window_layers": 0,
    }
    err = failure(
        to_megatron, ["--hf-dir", write_config(tmp_path / "hf", values), "--save", tmp_path / "o"], capsys
    )
    assert "use_sliding_window=True" in err


def test_missing_shard_file(converted, tmp_path, capsys):
    _, hf_dir, _ = converted("llama_gqa_sharded")
    broken = tmp_path / "hf"
    shutil.copytree(hf_dir, broken)
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    err = failure(to_megatron, ["--hf-dir", broken, "--save", tmp_path / "o"], capsys)
    assert f"shard file(s) {victim.name} named by model.safetensors.index.json are missing" in err


def test_config_and_weights_shape_mismatch(converted, tmp_path, capsys):
    _, hf_dir, _ = converted("qwen2_qkv_bias")
    broken = tmp_path / "hf"
    shutil.copytree(hf_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    err = failure(to_megatron, ["--hf-dir", broken, "--save", tmp_path / "o"], capsys)
    assert "model.layers.0.mlp.gate_proj.weight has shape [96, 64] but config.json implies [80, 64]" in err


def test_missing_and_unexpected_tensors(converted, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    _, hf_dir, _ = converted("qwen3_qk_norm_tied")
    broken = tmp_path / "hf"
    shutil.copytree(hf_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(12)  # ignored, never reported
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    err = failure(to_megatron, ["--hf-dir", broken, "--save", tmp_path / "o"], capsys)
    assert "1 tensor(s) missing: lm_head.weight" in err
    assert (
        "unexpected tensor model.layers.0.self_attn.o_proj.bias (shape [64])" in err and "inv_freq" not in err
    )


def test_pytorch_bin_only_directory_is_refused(converted, tmp_path, capsys):
    _, hf_dir, _ = converted("qwen2_qkv_bias")
    only_bin = tmp_path / "hf"
    only_bin.mkdir()
    shutil.copy(hf_dir / "config.json", only_bin)
    (only_bin / "pytorch_model.bin").write_bytes(b"")
    err = failure(to_megatron, ["--hf-dir", only_bin, "--save", tmp_path / "o"], capsys)
    assert (
        "neither model.safetensors.index.json nor model.safetensors" in err
        and "safe_serialization=True" in err
    )


def test_existing_save_needs_overwrite_and_is_replaced_whole(converted, tmp_path, capsys):
    _, hf_dir, _ = converted("qwen2_qkv_bias")
    save = tmp_path / "ckpt"
    save.mkdir()
    (save / "old.txt").write_text("keep me")
    err = failure(to_megatron, ["--hf-dir", hf_dir, "--save", save], capsys)
    assert "--save" in err and "--overwrite" in err and (save / "old.txt").read_text() == "keep me"
    assert to_megatron.main(["--hf-dir", str(hf_dir), "--save", str(save), "--overwrite"]) == 0
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000000", "latest_checkpointed_iteration.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging left behind


def test_export_refusals(converted, tmp_path, capsys):
    _, hf_dir, ckpt = converted("llama_gqa_sharded")
    _, tokenized_dir, _ = converted("qwen2_qkv_bias")
    err = failure(
        to_hf, ["--load", ckpt, "--output-dir", tmp_path / "a", "--architecture", "Qwen3ForCausalLM"], capsys
    )
    assert "cannot be written as Qwen3ForCausalLM" in err and "qk_layernorm=False" in err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("")
    err = failure(to_hf, ["--load", ckpt, "--output-dir", tmp_path / "b"], capsys)
    assert "--output-dir" in err and "--overwrite" in err
    err = failure(to_hf, ["--load", tmp_path / "nowhere", "--output-dir", tmp_path / "c"], capsys)
    assert "--load" in err and "no such directory" in err
    err = failure(to_hf, ["--load", ckpt, "--output-dir", tmp_path / "d", "--max-shard-size", "lots"], capsys)
    assert "--max-shard-size 'lots'" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


def test_export_refuses_a_different_tokenizer(converted, tmp_path, capsys):
    _, hf_dir, ckpt = converted("qwen2_qkv_bias")
    other = tmp_path / "tok"
    other.mkdir()
    write_tokenizer(other)
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace("w39", "zz"))
    err = failure(to_hf, ["--load", ckpt, "--output-dir", tmp_path / "o", "--tokenizer-dir", other], capsys)
    assert "is not the tokenizer this checkpoint was trained with" in err


def test_model_config_errors_are_reported_with_the_file():
    values = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        **BASE,
        "num_key_value_heads": 3,
    }
    with pytest.raises(HFConversionError, match="config.json: .*not divisible by --num-query-groups 3"):
        model_config_from_hf(values)


def test_command_line_prints_one_error_line(tmp_path):
    hf_dir = write_config(tmp_path / "hf", {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    proc = python(
        "tools/convert_hf_to_megatron.py", "--hf-dir", hf_dir, "--save", tmp_path / "o", check=False
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "GPT2LMHeadModel" in proc.stderr
