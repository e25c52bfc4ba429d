"""How a Hugging Face LLaMA / Mistral / Qwen2 / Qwen3 (dense) or Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint maps onto our megatron-core ``GPTModel``.

Shared by ``tools/convert_hf_to_megatron.py`` and ``tools/convert_megatron_to_hf.py``, so both
directions use one table: HF ``config.json`` <-> ``ModelConfig``, and each HF tensor name <-> the
slice of a megatron parameter that holds it (a ``Placement``). Copying HF -> megatron writes into
the slice; exporting reads the same slice back, so the round trip is exact by construction.

Legend: H = hidden size, F = ffn hidden size, d = head dim, nh = query heads, ng = query groups
(key/value heads), r = nh / ng, V = true vocabulary rows, Vp = padded rows. HF linear weights are
[out, in]. Megatron fuses per query group: linear_qkv rows are [ng, (r + 2) * d] = for each group
its r query heads, then its key head, then its value head; linear_fc1 rows are [gate (F) | up (F)].
MoE: E routed experts of hidden size Fe (router [E, H]; expert j's fc1 [2 Fe, H], fc2 [H, Fe]) and,
for Qwen2-MoE, a shared expert of hidden size Fs with a sigmoid gate [1, H].
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_ddk.config import ModelConfig
from megatron_ddk.errors import UserError

MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
SUPPORTED_ARCHITECTURES = tuple(MODEL_TYPES)
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
QKV_BIAS_ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
QK_NORM_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
ROPE_SCALING_TYPES = ("llama3",)
"""HF ``rope_scaling`` types reproduced exactly; yarn, dynamic, linear, longrope, ... are refused."""
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
IGNORED_HF_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
"""Buffers some older exports store; RoPE is recomputed from rope_theta, so they carry no weights."""


class HFConversionError(UserError, ValueError):
    """The HF checkpoint (or our checkpoint, on export) cannot be converted; the message says why."""


# ------------------------------------------------------------------------------------------- config


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """``config.json`` with the HF class defaults filled in (as transformers would run the model)."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise HFConversionError(
            f"--hf-dir {hf_dir}: no config.json; point it at a Hugging Face model directory"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HFConversionError(f"{path} is not valid JSON ({err})") from err
    architecture = hf_architecture(raw, source=path)
    try:
        from transformers import AutoConfig
    except ImportError as err:
        raise HFConversionError(
            "reading a Hugging Face config needs transformers: pip install 'megatron-ddk[hf]'"
        ) from err
    try:
        values = AutoConfig.for_model(MODEL_TYPES[architecture], **_without_meta(raw)).to_dict()
    except (ValueError, TypeError, KeyError) as err:
        raise HFConversionError(f"{path}: transformers cannot read it as {architecture}: {err}") from err
    values["architectures"] = [architecture]
    values["torch_dtype"] = raw.get("torch_dtype") or raw.get("dtype")
    return values


def hf_architecture(values: dict[str, Any], *, source: Path | str) -> str:
    architectures = values.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
        found = architectures or f"model_type {values.get('model_type')!r} without architectures"
        raise HFConversionError(
            f"{source}: architectures {found} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if MODEL_TYPES[architectures[0]] != values.get("model_type", MODEL_TYPES[architectures[0]]):
        raise HFConversionError(
            f"{source}: architectures {architectures} does not match model_type "
            f"{values.get('model_type')!r}; fix config.json"
        )
    return architectures[0]


def model_config_from_hf(values: dict[str, Any], *, source: Path | str = "config.json") -> ModelConfig:
    """HF config values (class defaults filled in) -> ``ModelConfig``; refuses what GPTModel cannot run."""
    architecture = hf_architecture(values, source=source)
    problems = []

    def refuse(field: str, why: str) -> None:
        problems.append(f"{field}={values.get(field)!r} ({why})")

    if values.get("hidden_act") != "silu":
        refuse("hidden_act", "only silu (SwiGLU) is supported")
    rope_type = _rope_scaling_type(values.get("rope_scaling"))
    if rope_type not in (None, *ROPE_SCALING_TYPES):
        refuse(
            "rope_scaling",
            f"RoPE scaling type {rope_type!r} is not implemented; only llama3 (Llama 3.x) is "
            "reproduced exactly (megatron-core's GPTModel has no yarn/dynamic/linear/longrope "
            "equivalent for these HF families)",
        )
    if values.get("mlp_bias"):
        refuse("mlp_bias", "MLP biases are not supported")
    if architecture not in QKV_BIAS_ARCHITECTURES and values.get("attention_bias"):
        refuse(
            "attention_bias",
            "a bias on o_proj has no place in megatron's linear_proj without biases "
            "everywhere; only Qwen2's q/k/v bias is supported",
        )
    if values.get("use_sliding_window") or any(
        t != "full_attention" for t in values.get("layer_types") or ()
    ):
        refuse("use_sliding_window", "sliding-window attention is not supported")
    elif values.get("sliding_window") is not None:
        refuse(
            "sliding_window", "sliding-window attention is not supported; only null (full attention) converts"
        )
    if architecture in MOE_ARCHITECTURES:
        problems += _moe_refusals(values, architecture)
    if problems:
        raise HFConversionError(f"{source}: cannot convert {architecture}: " + "; ".join(problems))

    heads = values["num_attention_heads"]
    kv_heads = values.get("num_key_value_heads") or heads
    head_dim = values.get("head_dim") or values["hidden_size"] // heads
    try:
        return _model_config(values, architecture, heads, kv_heads, head_dim)
    except ValueError as err:
        raise HFConversionError(f"{source}: {err}") from err


def _moe_refusals(values: dict[str, Any], architecture: str) -> list[str]:
    """Routing variants megatron-core's router does not reproduce exactly, one entry per field."""
    problems = []
    if values.get("router_jitter_noise"):
        problems.append(
            f"router_jitter_noise={values['router_jitter_noise']!r} (multiplicative router noise in "
            "training has no megatron-core equivalent; set it to 0.0)"
        )
    if values.get("mlp_only_layers"):
        problems.append(
            f"mlp_only_layers={values['mlp_only_layers']!r} (dense layers among MoE layers are not "
            "supported; every layer must be MoE)"
        )
    if values.get("decoder_sparse_step", 1) != 1:
        problems.append(f"decoder_sparse_step={values['decoder_sparse_step']!r} (only 1, every layer MoE)")
    renormalised = architecture == "MixtralForCausalLM" or values.get("norm_topk_prob")
    if values.get("num_experts_per_tok") == 1 and renormalised:
        field = "num_experts_per_tok" if architecture == "MixtralForCausalLM" else "norm_topk_prob"
        problems.append(
            f"{field}={values.get(field)!r} with top-1 routing (a renormalised top-1 weight is always 1; "
            "megatron-core's router refuses top-1 without pre-softmax, whose weight is the probability)"
        )
    if architecture == "Qwen2MoeForCausalLM" and not values.get("shared_expert_intermediate_size"):
        problems.append(
            f"shared_expert_intermediate_size={values.get('shared_expert_intermediate_size')!r} "
            "(Qwen2-MoE always runs its shared expert; a size of 0 has no megatron-core equivalent)"
        )
    return problems


def _moe_fields(values: dict[str, Any], architecture: str) -> dict[str, Any]:
    """ModelConfig MoE fields; HF's routing (softmax over all experts, top-k, optional renormalisation)
    equals megatron's top-k-then-softmax when renormalised and its pre-softmax top-k when not."""
    if architecture not in MOE_ARCHITECTURES:
        return {}
    mixtral = architecture == "MixtralForCausalLM"
    shared = values.get("shared_expert_intermediate_size") if architecture == "Qwen2MoeForCausalLM" else None
    return dict(
        num_experts=values["num_local_experts"] if mixtral else values["num_experts"],
        moe_router_topk=values["num_experts_per_tok"],
        moe_ffn_hidden_size=None if mixtral else values["moe_intermediate_size"],
        moe_router_pre_softmax=False if mixtral else not values.get("norm_topk_prob", False),
        moe_shared_expert_intermediate_size=shared,
        moe_shared_expert_gate=shared is not None,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=float(values.get("router_aux_loss_coef") or 0.0),
    )


def _rope_scaling_fields(values: dict[str, Any]) -> dict[str, Any]:
    scaling = values.get("rope_scaling")
    if _rope_scaling_type(scaling) != "llama3":
        return {}
    return dict(
        use_rope_scaling=True,
        rope_scaling_factor=float(scaling["factor"]),
        rope_scaling_low_freq_factor=float(scaling["low_freq_factor"]),
        rope_scaling_high_freq_factor=float(scaling["high_freq_factor"]),
        rope_scaling_original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _model_config(
    values: dict[str, Any], architecture: str, heads: int, kv_heads: int, head_dim: int
) -> ModelConfig:
    return ModelConfig(
        num_layers=values["num_hidden_layers"],
        hidden_size=values["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=None if kv_heads == heads else kv_heads,
        kv_channels=None if head_dim * heads == values["hidden_size"] else head_dim,
        ffn_hidden_size=values["intermediate_size"],
        vocab_size=values["vocab_size"],
        max_position_embeddings=values["max_position_embeddings"],
        normalization="RMSNorm",
        norm_epsilon=values["rms_norm_eps"],
        swiglu=True,
        position_embedding_type="rope",
        rotary_base=float(values.get("rope_theta", 10000.0)),
        untie_embeddings_and_output_weights=not values.get("tie_word_embeddings", False),
        add_bias_linear=False,
        add_qkv_bias=architecture == "Qwen2ForCausalLM"
        or (architecture == "Qwen2MoeForCausalLM" and bool(values.get("qkv_bias", True))),
        qk_layernorm=architecture in QK_NORM_ARCHITECTURES,
        init_method_std=values.get("initializer_range", 0.02),
        attention_dropout=values.get("attention_dropout", 0.0),
        hidden_dropout=0.0,
        **_rope_scaling_fields(values),
        **_moe_fields(values, architecture),
    )


def default_architecture(model: ModelConfig) -> str:
    """The HF family a ``ModelConfig`` came from: q/k norm -> Qwen3, q/k/v bias -> Qwen2, else LLaMA;
    for MoE: a shared expert -> Qwen2-MoE, q/k norm -> Qwen3-MoE, else Mixtral. (Mistral without a
    sliding window is LLaMA's HF form; ask for it with --architecture.)"""
    if model.is_moe:
        if model.moe_shared_expert_intermediate_size:
            return "Qwen2MoeForCausalLM"
        return "Qwen3MoeForCausalLM" if model.qk_layernorm else "MixtralForCausalLM"
    if model.qk_layernorm:
        return "Qwen3ForCausalLM"
    if model.add_qkv_bias:
        return "Qwen2ForCausalLM"
    return "LlamaForCausalLM"


def hf_config_values(
    model: ModelConfig, *, architecture: str, dtype: torch.dtype, token_ids: dict[str, int | None]
) -> dict[str, Any]:
    """Keyword arguments of the HF config class for ``model``; raises if the family cannot express it."""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise HFConversionError(
            f"--architecture {architecture} is not supported; use one of {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    problems = []
    if model.normalization != "RMSNorm":
        problems.append(f"normalization {model.normalization} (HF needs RMSNorm)")
    if not model.swiglu:
        problems.append("a non-SwiGLU MLP (HF needs swiglu)")
    if model.position_embedding_type != "rope" or model.rotary_percent != 1.0:
        problems.append(
            f"position embedding {model.position_embedding_type} with rotary_percent "
            f"{model.rotary_percent} (HF needs full RoPE)"
        )
    if model.add_bias_linear:
        problems.append("add_bias_linear=True (the HF families have no MLP/output-projection biases)")
    wants_norm = architecture in QK_NORM_ARCHITECTURES
    if architecture == "Qwen2ForCausalLM" and not model.add_qkv_bias:
        problems.append(f"add_qkv_bias=False but {architecture} always has q/k/v biases")
    if architecture not in QKV_BIAS_ARCHITECTURES and model.add_qkv_bias:
        problems.append(f"add_qkv_bias=True but {architecture} has no q/k/v biases")
    if model.qk_layernorm != wants_norm:
        problems.append(
            f"qk_layernorm={model.qk_layernorm} but {architecture} "
            f"{'always has' if wants_norm else 'has no'} q/k norms"
        )
    problems += _moe_export_problems(model, architecture)
    if problems:
        raise HFConversionError(
            f"this checkpoint cannot be written as {architecture}: "
            + "; ".join(problems)
            + "; pick another --architecture or leave it to the default"
        )
    values: dict[str, Any] = dict(
        architectures=[architecture],
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.query_groups,
        max_position_embeddings=model.max_position_embeddings,
        rms_norm_eps=model.norm_epsilon,
        rope_theta=model.rotary_base,
        hidden_act="silu",
        tie_word_embeddings=not model.untie_embeddings_and_output_weights,
        initializer_range=model.init_method_std,
        attention_dropout=model.attention_dropout,
        torch_dtype=dtype,
        **token_ids,
    )
    if architecture in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM"):
        values.update(use_sliding_window=False)
        if model.kv_channels is not None:  # Qwen2 reads head_dim only when given
            values.update(head_dim=model.head_dim)
    else:
        values.update(head_dim=model.head_dim, attention_bias=False)
    if architecture in ("MistralForCausalLM", "MixtralForCausalLM"):
        values.update(sliding_window=None)
    if architecture == "LlamaForCausalLM":
        values.update(mlp_bias=False)
    if (
        architecture != "MistralForCausalLM" or model.use_rope_scaling
    ):  # MistralConfig has no rope_scaling field
        values.update(rope_scaling=_hf_rope_scaling(model))
    if model.is_moe:
        values.update(_hf_moe_values(model, architecture))
    return values


def _moe_export_problems(model: ModelConfig, architecture: str) -> list[str]:
    if architecture not in MOE_ARCHITECTURES:
        return (
            [
                f"num_experts={model.num_experts} (a dense HF family has no experts; use one of "
                f"{', '.join(MOE_ARCHITECTURES)})"
            ]
            if model.is_moe
            else []
        )
    if not model.is_moe:
        return [f"a dense model ({architecture} is a mixture of experts)"]
    problems = []
    shared = model.moe_shared_expert_intermediate_size
    if architecture == "Qwen2MoeForCausalLM":
        if not (shared and model.moe_shared_expert_gate):
            problems.append("no gated shared expert (Qwen2-MoE always has one)")
    elif shared:
        problems.append(f"a shared expert ({architecture} has none)")
    if architecture == "MixtralForCausalLM" and model.moe_router_pre_softmax:
        problems.append("moe_router_pre_softmax=True (Mixtral renormalises the top-k probabilities)")
    if architecture == "MixtralForCausalLM" and model.moe_ffn_hidden_size not in (
        None,
        model.ffn_hidden_size,
    ):
        problems.append(
            f"moe_ffn_hidden_size={model.moe_ffn_hidden_size} differs from ffn_hidden_size "
            f"{model.ffn_hidden_size} (Mixtral has one intermediate_size)"
        )
    return problems


def _hf_moe_values(model: ModelConfig, architecture: str) -> dict[str, Any]:
    common = dict(num_experts_per_tok=model.moe_router_topk, router_aux_loss_coef=model.moe_aux_loss_coeff)
    if architecture == "MixtralForCausalLM":
        return dict(common, num_local_experts=model.num_experts, router_jitter_noise=0.0)
    values = dict(
        common,
        num_experts=model.num_experts,
        moe_intermediate_size=model.expert_ffn_hidden_size,
        norm_topk_prob=not model.moe_router_pre_softmax,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    if architecture == "Qwen2MoeForCausalLM":
        values.update(
            shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
            qkv_bias=model.add_qkv_bias,
        )
    return values


def _hf_rope_scaling(model: ModelConfig) -> dict[str, Any] | None:
    if not model.use_rope_scaling:
        return None
    return dict(
        rope_type="llama3",
        factor=model.rope_scaling_factor,
        low_freq_factor=model.rope_scaling_low_freq_factor,
        high_freq_factor=model.rope_scaling_high_freq_factor,
        original_max_position_embeddings=model.rope_scaling_original_max_position_embeddings,
    )


def _rope_scaling_type(value: Any) -> str | None:
    """None for plain RoPE (null, or type "default" without parameters), else the HF rope type."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return repr(value)
    kind = value.get("rope_type") or value.get("type")
    if kind == "default" and set(value) <= {"rope_type", "type"}:
        return None
    return kind


def _without_meta(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version", "_name_or_path")}


# ------------------------------------------------------------------------------------------ tensors


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Where one HF tensor lives inside a megatron parameter.

    ``select(param)`` is a view of ``param``: reshape it to ``grouped`` (when set), then index it. The
    view has as many elements as the HF tensor (of shape ``hf_shape``), in the same order.
    """

    megatron_key: str
    hf_shape: tuple[int, ...]
    grouped: tuple[int, ...] | None = None
    index: tuple[slice, ...] = ()
    keep_rows: int | None = None
    """Import only the first rows of the HF tensor (a vocabulary trimmed to the tokenizer's size)."""

    def select(self, param: torch.Tensor) -> torch.Tensor:
        view = param.view(self.grouped) if self.grouped is not None else param
        return view[self.index] if self.index else view


def _swiglu_placements(hf: str, mc: str, h: int, f: int, names=("gate_proj", "up_proj", "down_proj")):
    """One SwiGLU MLP: HF gate [F, H] and up [F, H] stacked in megatron's fc1 [2F, H]; down = fc2 [H, F]."""
    gate, up, down = names
    fc1 = mc + "linear_fc1.weight"
    return {
        hf + f"{gate}.weight": Placement(megatron_key=fc1, hf_shape=(f, h), index=(slice(0, f),)),
        hf + f"{up}.weight": Placement(megatron_key=fc1, hf_shape=(f, h), index=(slice(f, 2 * f),)),
        hf + f"{down}.weight": Placement(megatron_key=mc + "linear_fc2.weight", hf_shape=(h, f)),
    }


def _moe_placements(model: ModelConfig, architecture: str, hf: str, mc: str) -> dict[str, Placement]:
    """Router, routed experts (keys of a TP1/EP1 model: expert j is local expert j) and shared expert."""
    h, fe, e = model.hidden_size, model.expert_ffn_hidden_size, model.num_experts
    if architecture == "MixtralForCausalLM":
        block, names = hf + "block_sparse_moe.", ("w1", "w3", "w2")
    else:
        block, names = hf + "mlp.", ("gate_proj", "up_proj", "down_proj")
    table = {block + "gate.weight": Placement(megatron_key=mc + "mlp.router.weight", hf_shape=(e, h))}
    for j in range(e):
        table.update(
            _swiglu_placements(f"{block}experts.{j}.", f"{mc}mlp.experts.local_experts.{j}.", h, fe, names)
        )
    if model.moe_shared_expert_intermediate_size:
        table.update(
            _swiglu_placements(
                block + "shared_expert.",
                mc + "mlp.shared_experts.",
                h,
                model.moe_shared_expert_intermediate_size,
            )
        )
        if model.moe_shared_expert_gate:
            table[block + "shared_expert_gate.weight"] = Placement(
                megatron_key=mc + "mlp.shared_experts.gate_weight", hf_shape=(1, h)
            )
    return table


def hf_placements(
    model: ModelConfig, *, hf_vocab_size: int | None = None, architecture: str | None = None
) -> dict[str, Placement]:
    """Every HF tensor name of ``model``'s HF form, in HF order, with its megatron placement.

    ``hf_vocab_size`` (import only): the HF embedding has this many rows, of which the first
    ``model.vocab_size`` are kept. ``architecture`` names the MoE tensors (Mixtral's differ from
    Qwen's); default: ``default_architecture(model)``.
    """
    h, f, d, v = model.hidden_size, model.ffn_hidden_size, model.head_dim, model.vocab_size
    ng, nh = model.query_groups, model.num_attention_heads
    r = nh // ng
    q_rows, k_rows, v_rows = slice(0, r * d), slice(r * d, (r + 1) * d), slice((r + 1) * d, (r + 2) * d)
    whole = slice(None)
    vocab_rows = v if hf_vocab_size is None else hf_vocab_size
    if vocab_rows < v:
        raise HFConversionError(f"the HF vocabulary ({vocab_rows} rows) is smaller than the model's ({v})")
    keep = None if vocab_rows == v else v
    table = {
        "model.embed_tokens.weight": Placement(
            megatron_key="embedding.word_embeddings.weight",
            hf_shape=(vocab_rows, h),
            index=(slice(0, v),),
            keep_rows=keep,
        )
    }
    for i in range(model.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        qkv = mc + "self_attention.linear_qkv."
        table[hf + "input_layernorm.weight"] = Placement(
            megatron_key=mc + "input_layernorm.weight", hf_shape=(h,)
        )
        for name, rows, heads in (("q", q_rows, nh), ("k", k_rows, ng), ("v", v_rows, ng)):
            # qkv weight [ng * (r + 2) * d, H] viewed [ng, (r + 2) * d, H]; HF [heads * d, H]
            table[hf + f"self_attn.{name}_proj.weight"] = Placement(
                megatron_key=qkv + "weight",
                hf_shape=(heads * d, h),
                grouped=(ng, (r + 2) * d, h),
                index=(whole, rows),
            )
            if model.add_qkv_bias:
                table[hf + f"self_attn.{name}_proj.bias"] = Placement(
                    megatron_key=qkv + "bias",
                    hf_shape=(heads * d,),
                    grouped=(ng, (r + 2) * d),
                    index=(whole, rows),
                )
        if model.qk_layernorm:
            table[hf + "self_attn.q_norm.weight"] = Placement(
                megatron_key=mc + "self_attention.q_layernorm.weight", hf_shape=(d,)
            )
            table[hf + "self_attn.k_norm.weight"] = Placement(
                megatron_key=mc + "self_attention.k_layernorm.weight", hf_shape=(d,)
            )
        table[hf + "self_attn.o_proj.weight"] = Placement(
            megatron_key=mc + "self_attention.linear_proj.weight", hf_shape=(h, nh * d)
        )
        table[hf + "post_attention_layernorm.weight"] = Placement(
            megatron_key=mc + "pre_mlp_layernorm.weight", hf_shape=(h,)
        )
        if model.is_moe:
            table.update(_moe_placements(model, architecture or default_architecture(model), hf, mc))
        else:
            table.update(_swiglu_placements(hf + "mlp.", mc + "mlp.", h, f))
    table["model.norm.weight"] = Placement(megatron_key="decoder.final_layernorm.weight", hf_shape=(h,))
    if model.untie_embeddings_and_output_weights:
        table["lm_head.weight"] = Placement(
            megatron_key="output_layer.weight", hf_shape=(vocab_rows, h), index=(slice(0, v),), keep_rows=keep
        )
    return table


def vocab_padding_rows(model: ModelConfig, params: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Views of the padded embedding/output rows (beyond the true vocabulary): zero on import, dropped on export."""
    keys = ["embedding.word_embeddings.weight"]
    if model.untie_embeddings_and_output_weights:
        keys.append("output_layer.weight")
    return [params[k][model.vocab_size :] for k in keys if k in params]


# --------------------------------------------------------------------------------- safetensors input


@dataclass(frozen=True, kw_only=True)
class HFWeights:
    """Where every tensor of a safetensors checkpoint lives and its shape, read from the file headers only."""

    files: dict[str, Path]
    """tensor name -> shard file."""
    shapes: dict[str, tuple[int, ...]]

    @property
    def shard_files(self) -> list[Path]:
        return sorted(set(self.files.values()))


def scan_safetensors(hf_dir: Path) -> HFWeights:
    """Read the index (or the single file) and every shard header; clear errors for missing shards."""
    from safetensors import safe_open

    index_path, single = hf_dir / SAFETENSORS_INDEX, hf_dir / SAFETENSORS_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise HFConversionError(
                f"{index_path} is not a safetensors index (no weight_map): {err}"
            ) from err
        shard_names = sorted(set(weight_map.values()))
    elif single.is_file():
        weight_map, shard_names = None, [SAFETENSORS_FILE]
    else:
        hint = (
            " (only PyTorch .bin weights found: re-save with save_pretrained(safe_serialization=True))"
            if any(hf_dir.glob("pytorch_model*.bin"))
            else ""
        )
        raise HFConversionError(
            f"--hf-dir {hf_dir}: neither {SAFETENSORS_INDEX} nor {SAFETENSORS_FILE}{hint}"
        )
    missing = [name for name in shard_names if not (hf_dir / name).is_file()]
    if missing:
        raise HFConversionError(
            f"--hf-dir {hf_dir}: shard file(s) {', '.join(missing)} named by {SAFETENSORS_INDEX} "
            "are missing; download them again"
        )
    files: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in shard_names:
        with safe_open(str(hf_dir / name), framework="pt") as handle:
            for key in handle.keys():
                files[key] = hf_dir / name
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    if weight_map is not None:
        wrong = sorted(k for k, shard in weight_map.items() if files.get(k) != hf_dir / shard)
        if wrong:
            raise HFConversionError(
                f"{index_path} places {len(wrong)} tensor(s) in shards that do not hold them "
                f"(e.g. {wrong[0]}); the download is inconsistent"
            )
    return HFWeights(files=files, shapes=shapes)


def check_hf_weights(
    weights: HFWeights, placements: dict[str, Placement], *, tied: bool, source: Path | str
) -> list[str]:
    """Every expected tensor present with its config shape, nothing unexpected; returns the names ignored."""
    problems, ignored = [], []
    missing = [k for k in placements if k not in weights.shapes]
    if missing:
        problems.append(
            f"{len(missing)} tensor(s) missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    for key, shape in weights.shapes.items():
        if key in placements:
            expected = placements[key].hf_shape
            if shape != expected:
                problems.append(f"{key} has shape {list(shape)} but config.json implies {list(expected)}")
        elif IGNORED_HF_TENSORS.fullmatch(key) or (tied and key == "lm_head.weight"):
            ignored.append(key)
        else:
            problems.append(
                f"unexpected tensor {key} (shape {list(shape)}) that this architecture does not use"
            )
    if problems:
        raise HFConversionError(f"{source}: the weights do not match config.json: " + "; ".join(problems))
    return ignored


@torch.no_grad()
def copy_hf_weights(
    params: dict[str, torch.Tensor], weights: HFWeights, placements: dict[str, Placement]
) -> int:
    """Stream every HF tensor into its megatron slice, one shard and one tensor at a time; returns the count."""
    from safetensors import safe_open

    copied = 0
    for shard in weights.shard_files:
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():
                placement = placements.get(key)
                if placement is None:
                    continue  # ignored by check_hf_weights (inv_freq, tied lm_head)
                target = placement.select(params[placement.megatron_key])
                if placement.keep_rows is None:
                    source = handle.get_tensor(key)
                else:
                    source = handle.get_slice(key)[: placement.keep_rows]  # reads only the kept rows
                target.copy_(source.reshape(target.shape))
                copied += 1
    return copied


def export_tensor(params: dict[str, torch.Tensor], placement: Placement, dtype: torch.dtype) -> torch.Tensor:
    """The HF tensor for ``placement``: a fresh contiguous copy (safetensors refuses shared storage)."""
    if placement.keep_rows is not None:
        raise ValueError("export placements never trim rows; build them without hf_vocab_size")
    view = placement.select(params[placement.megatron_key])
    return view.to(dtype=dtype, copy=True).reshape(placement.hf_shape).contiguous()
