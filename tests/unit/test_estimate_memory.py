"""tools/estimate_memory.py: preset parameter counts, per-component arithmetic and how memory scales."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest

from megatron_ddk.config import ModelConfig
from tests.helpers import REPO_ROOT, python

if str(REPO_ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "tools"))
import estimate_memory as em  # noqa: E402

GIB = 1024**3


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("qwen1.5-1.8b", 1.84),
        ("tinyllama-1.1b", 1.10),
        ("llama2-13b", 13.0),
        ("qwen1.5-14b", 14.2),
        ("qwen3-1.7b", 1.7),  # the card rounds to 1.7B (1.4B without the tied embedding)
    ],
)
def test_preset_parameter_counts_match_the_published_totals(name, billions):
    assert em.PRESETS[name].num_parameters() == pytest.approx(billions * 1e9, rel=0.03)


@pytest.mark.parametrize("name", list(em.PRESETS))
def test_stages_add_up_to_the_model(name):
    """Summed over PP stages at TP=1 (vocab a multiple of 128: no padding), every parameter counts once."""
    model = em.PRESETS[name]
    assert model.vocab_size % 128 == 0
    for pp in (1, 2):
        total = sum(em.stage_parameters(model, tp=1, pp=pp, stage=s) for s in range(pp))
        tied_copy = (
            model.vocab_size * model.hidden_size
            if pp > 1 and not model.untie_embeddings_and_output_weights
            else 0
        )  # a tied output layer lives on the last stage too
        assert total == model.num_parameters() + tied_copy


def test_layer_parameters_of_a_small_model_by_hand():
    model = ModelConfig(
        num_layers=2,
        hidden_size=8,
        num_attention_heads=2,
        num_query_groups=1,
        ffn_hidden_size=12,
        vocab_size=100,
        max_position_embeddings=16,
        add_qkv_bias=True,
    )
    # head dim 4: q 8, k+v 2*1*4 = 8 -> qkv 8*16 + bias 16, proj 8*8, fc1 8*24, fc2 12*8, two RMSNorms 2*8
    assert model.layer_parameters() == 8 * 16 + 16 + 64 + 8 * 24 + 96 + 16
    # TP=2 splits every matrix and the qkv bias; the norms stay whole.
    assert model.layer_parameters(tp=2) == (8 * 16 + 16 + 64 + 8 * 24 + 96) // 2 + 16


def test_activation_bytes_by_hand():
    model = ModelConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=2,
        ffn_hidden_size=16,
        vocab_size=128,
        max_position_embeddings=4,
    )
    layout = em.Layout(seq_length=4, micro_batch_size=3)
    # s*b = 12 tokens x (4h + (q + 2kv) + q + 3f) = 12 x (32 + 24 + 8 + 48) elements of 2 bytes, + fp32 LSE per head
    assert em.layer_activation_bytes(model, layout) == 12 * 112 * 2 + 12 * 2 * 4
    unfused = replace(layout, flash_attention=False)
    assert em.layer_activation_bytes(model, unfused) == 12 * 112 * 2 + 2 * 4 * 4 * 3 * 2
    sp = replace(layout, tp=2, sequence_parallel=True)
    assert em.layer_activation_bytes(model, sp) == 12 * 112 * 2 / 2 + 12 * 2 / 2 * 4


def _qwen(layout: em.Layout) -> em.Estimate:
    return em.estimate(em.PRESETS["qwen1.5-14b"], em.PRESETS["qwen1.5-1.8b"], layout)


def test_bf16_training_state_is_16_bytes_per_student_parameter():
    result = _qwen(em.Layout(dp=8))
    p = em.stage_parameters(em.PRESETS["qwen1.5-1.8b"], tp=1, pp=1, stage=0)
    assert result.by_name("student weights") == 2 * p
    assert result.by_name("student grads") == 4 * p
    assert result.by_name("optimizer state") == 12 * p  # replicated without the distributed optimizer
    assert result.by_name("teacher weights") == 2 * em.PRESETS["qwen1.5-14b"].num_parameters()


def test_distributed_optimizer_divides_only_the_optimizer_state_by_dp():
    plain = _qwen(em.Layout(dp=8))
    sharded = _qwen(em.Layout(dp=8, use_distributed_optimizer=True))
    assert sharded.by_name("optimizer state") == pytest.approx(plain.by_name("optimizer state") / 8)
    for name in ("teacher weights", "student weights", "student grads", "activations", "logits and KD loss"):
        assert sharded.by_name(name) == plain.by_name(name)
    wider = _qwen(em.Layout(dp=16, use_distributed_optimizer=True))
    assert wider.by_name("optimizer state") == pytest.approx(sharded.by_name("optimizer state") / 2)


def test_tensor_parallelism_halves_weights_and_logits():
    # a fixed KD chunk in tokens (the default fixes logits per chunk, so its workspace does not shrink)
    one, two = _qwen(em.Layout(tp=1, kd_chunk_size=1024)), _qwen(em.Layout(tp=2, kd_chunk_size=1024))
    for name in ("teacher weights", "student weights", "student grads", "logits and KD loss"):
        assert two.by_name(name) == pytest.approx(one.by_name(name) / 2, rel=0.002)  # norms are replicated
    # Without sequence parallelism the norms' [s, b, h] tensors stay whole on every TP rank.
    assert one.by_name("activations") / 2 < two.by_name("activations") < one.by_name("activations")
    sp = _qwen(em.Layout(tp=2, sequence_parallel=True))
    assert sp.by_name("activations") == pytest.approx(one.by_name("activations") / 2, rel=0.01)


def test_activations_scale_with_micro_batch_and_1f1b_in_flight_count():
    one, two = _qwen(em.Layout(micro_batch_size=1)), _qwen(em.Layout(micro_batch_size=2))
    assert two.by_name("activations") == pytest.approx(2 * one.by_name("activations"))
    # PP=4: stage 0 holds 4 micro-batches of 6 layers = as much as PP=1 holds of 24 layers x 1.
    teacher, student = em.PRESETS["qwen1.5-14b"], em.PRESETS["qwen1.5-1.8b"]
    pp4 = em.Layout(pp=4)
    stages = [em.estimate_stage(teacher, student, pp4, s) for s in range(4)]
    assert [s.by_name("activations") for s in stages] == pytest.approx(
        [one.by_name("activations") * k / 4 for k in (4, 3, 2, 1)]
    )
    assert stages[-1].by_name("logits and KD loss") > 0 and stages[0].by_name("logits and KD loss") == 0
    assert stages[1].by_name("pipeline buffers") == 2 * 3 * 2048 * (2048 + 5120) * 2
    # Fewer micro-batches than stages cap what is in flight.
    few = replace(pp4, global_batch_size=2)
    assert em.estimate_stage(teacher, student, few, 0).by_name("activations") == pytest.approx(
        one.by_name("activations") * 2 / 4
    )


def test_without_a_teacher_there_is_no_teacher_memory():
    result = em.estimate(None, em.PRESETS["tinyllama-1.1b"], em.Layout())
    assert result.by_name("teacher weights") == 0 and result.by_name("teacher working set") == 0
    with_teacher = em.estimate(em.PRESETS["llama2-13b"], em.PRESETS["tinyllama-1.1b"], em.Layout())
    assert result.by_name("logits and KD loss") < with_teacher.by_name("logits and KD loss")


def test_the_paper_setups_fit_80_gib_with_the_sbatch_layouts():
    qwen = _qwen(em.Layout(dp=16, micro_batch_size=1, use_distributed_optimizer=True))
    llama = em.estimate(
        em.PRESETS["llama2-13b"],
        em.PRESETS["tinyllama-1.1b"],
        em.Layout(dp=16, micro_batch_size=2, use_distributed_optimizer=True),
    )
    assert 40 * GIB < qwen.total < 80 * GIB
    assert 30 * GIB < llama.total < 80 * GIB


def test_valid_layouts_respect_layers_heads_and_gpus():
    llama = em.valid_layouts(em.PRESETS["llama2-13b"], em.PRESETS["tinyllama-1.1b"], num_gpus=16)
    # 22 student layers -> PP in {1, 2}; TinyLlama's 4 key-value groups -> TP <= 4.
    assert llama == [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2)]
    qwen = em.valid_layouts(em.PRESETS["qwen1.5-14b"], em.PRESETS["qwen1.5-1.8b"], num_gpus=16)
    assert {pp for _, pp in qwen} == {1, 2, 4, 8} and {tp for tp, _ in qwen} == {1, 2, 4, 8}
    assert all(16 % (tp * pp) == 0 for tp, pp in qwen)


def test_bad_layouts_are_refused_with_the_flag_named():
    with pytest.raises(em.EstimateError, match="--pp 3 does not divide the student's 22 layers"):
        em.estimate(None, em.PRESETS["tinyllama-1.1b"], em.Layout(pp=3))
    with pytest.raises(em.EstimateError, match="--tp 8 does not divide the student's 32 attention heads / 4"):
        em.estimate(None, em.PRESETS["tinyllama-1.1b"], em.Layout(tp=8))
    with pytest.raises(em.EstimateError, match="--sequence-parallel needs --tp > 1"):
        em.estimate(None, em.PRESETS["tinyllama-1.1b"], em.Layout(sequence_parallel=True))


def test_shape_flags_override_or_replace_a_preset():
    model = em.resolve_model("qwen1.5-1.8b", "num_layers=12,add_qkv_bias=false", "student")
    assert model.num_layers == 12 and not model.add_qkv_bias and model.hidden_size == 2048
    custom = em.resolve_model(
        None,
        "num_layers=2,hidden_size=64,num_attention_heads=4,ffn_hidden_size=128,"
        "vocab_size=1000,max_position_embeddings=128",
        "teacher",
    )
    assert custom.num_layers == 2 and custom.vocab_size == 1000
    assert em.resolve_model("none", None, "teacher") is None
    with pytest.raises(em.EstimateError, match="--student-shape: 'layers=2' is not NAME=VALUE"):
        em.resolve_model("qwen1.5-1.8b", "layers=2", "student")
    with pytest.raises(em.EstimateError, match="--teacher 'gpt5' is not a preset"):
        em.resolve_model("gpt5", None, "teacher")


def test_cli_prints_one_row_per_component_and_a_sweep():
    out = python(
        "tools/estimate_memory.py",
        "--teacher",
        "qwen1.5-14b",
        "--student",
        "qwen1.5-1.8b",
        "--dp",
        "16",
        "--use-distributed-optimizer",
        timeout=120,
    ).stdout
    rows = [line.split()[0] for line in out.splitlines()[3:] if line and not line.startswith("-")]
    assert rows[:3] == ["teacher", "student", "student"] and "total" in rows
    assert "fits in 80 GiB" in out
    sweep = python(
        "tools/estimate_memory.py",
        "--teacher",
        "llama2-13b",
        "--student",
        "tinyllama-1.1b",
        "--sweep",
        "--num-gpus",
        "16",
        "--gpu-memory-gib",
        "20",
        timeout=120,
    ).stdout
    table = [line.split() for line in sweep.splitlines()[3:]]
    assert [(int(r[0]), int(r[1])) for r in table] == [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2)]
    assert table[0][-1] == "no" and table[-1][-1] == "yes"  # TP1 PP1 > 20 GiB; TP4 PP2 fits


def test_cli_errors_are_one_line():
    proc = python(
        "tools/estimate_memory.py", "--student", "tinyllama-1.1b", "--pp", "3", check=False, timeout=120
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1].startswith("estimate_memory.py: error: --pp 3 does not divide")
    )


@pytest.mark.parametrize("name", sorted(em.PUBLISHED_PARAMETERS))
def test_llama3_mixtral_qwen3_presets_within_one_percent_of_the_model_cards(name):
    assert em.PRESETS[name].num_parameters() == pytest.approx(em.PUBLISHED_PARAMETERS[name], rel=0.01)


def test_moe_layer_parameters_by_hand_and_expert_parallel_split():
    model = ModelConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=2,
        ffn_hidden_size=12,
        vocab_size=128,
        max_position_embeddings=16,
        num_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=6,
        moe_shared_expert_intermediate_size=10,
        moe_shared_expert_gate=True,
        add_bias_linear=False,
    )
    attention, expert, shared = 8 * 24 + 8 * 8, 3 * 8 * 6, 3 * 8 * 10
    replicated = 2 * 8 + 4 * 8 + 8  # two RMSNorms, router [4, 8], shared-expert gate [1, 8]
    assert model.layer_parameters() == attention + 4 * expert + shared + replicated
    assert model.layer_parameters(tp=2, ep=2) == (attention + shared) // 2 + 4 * expert // 4 + replicated
    assert model.layer_matmul_parameters() == attention + 4 * 8 + 2 * expert + shared  # active per token
    assert model.num_parameters() == model.layer_parameters() + 2 * 128 * 8 + 8


def test_expert_parallelism_divides_only_the_teachers_experts():
    teacher, student = em.PRESETS["qwen3-30b-a3b"], em.PRESETS["qwen3-1.7b"]
    base = em.Layout(dp=8, micro_batch_size=1, seq_length=2048, use_distributed_optimizer=True)
    ep1, ep8 = em.estimate(teacher, student, base), em.estimate(teacher, student, replace(base, ep=8))
    assert ep1.by_name("teacher weights") / GIB == pytest.approx(56.9, abs=0.1)
    assert ep8.by_name("teacher weights") / GIB == pytest.approx(9.6, abs=0.1)
    assert ep8.by_name("student weights") == ep1.by_name(
        "student weights"
    )  # dense student: EP changes nothing
    with pytest.raises(em.EstimateError, match="--ep 16 must divide --dp 8"):
        em.estimate(teacher, student, replace(base, ep=16))
    with pytest.raises(em.EstimateError, match="--ep 3 does not divide the teacher's 128 experts"):
        em.estimate(teacher, student, replace(base, dp=3, ep=3))
