"""megatron_ddk.platform.cpu_compat: every patch makes the megatron-core call it targets work on CPU.

One test per entry of ``PATCHES`` exercises the real megatron-core 0.16.1 code path the patch fixes
(and checks the numbers it produces), plus: apply is idempotent and returns the names, it changes
nothing when CUDA is reported available (a fresh subprocess, where the unpatched calls are also
shown to fail on this CUDA-less torch), and ``import megatron_ddk`` refuses another megatron-core.

Shapes: [s, b, h] = sequence, micro-batch, hidden (megatron-core's layout); logits [b, s, v].
"""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

from megatron_ddk.platform import cpu_compat
from megatron_ddk.platform.distributed import ParallelLayout, destroy, initialize, set_seed
from tests.helpers import SCRIPTS, python, torchrun

SEQ, MICRO_BATCH, VOCAB = 8, 2, 64


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    """torch.distributed (gloo, world size 1) + megatron parallel state; applies the patches."""
    initialize(ParallelLayout(world_size=1))
    set_seed(1234)
    yield
    destroy()


# ------------------------------------------------------------------------------------------ helpers


def tiny_gpt(*, bf16: bool = False):
    """A 2-layer GPTModel (local spec, RoPE, causal mask built by megatron itself)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
        use_cpu_initialization=True, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        attention_dropout=0.0, hidden_dropout=0.0,
    )
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                    max_sequence_length=SEQ, position_embedding_type="rope")


def tiny_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=gen)
    return {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ),
    }


def lm_loss(model, batch) -> torch.Tensor:
    """Mean token CE; attention_mask=None makes megatron build its default causal mask."""
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [b, s]
    return per_token.float().mean()


def ddp_wrap(model, *, distributed_optimizer: bool = False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               use_distributed_optimizer=distributed_optimizer)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def megatron_optimizer(ddp_model, **overrides):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    settings = {"optimizer": "adam", "lr": 1e-2, "weight_decay": 0.0, "clip_grad": 0.0} | overrides
    return get_megatron_optimizer(OptimizerConfig(**settings), [ddp_model])


def inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def train_step(ddp_model, optimizer, batch):
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    loss = lm_loss(ddp_model, batch)
    loss.backward()
    ddp_model.finish_grad_sync()
    return loss, optimizer.step()


# ------------------------------------------------------------------------------ apply_cpu_compat


def test_apply_returns_every_patch_name_and_is_idempotent():
    names = cpu_compat.apply_cpu_compat()
    assert names == list(cpu_compat.PATCHES) and len(names) == 10
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    get_emb = RotaryEmbedding.get_emb
    assert cpu_compat.apply_cpu_compat() == names  # a second call re-applies nothing
    assert RotaryEmbedding.get_emb is get_emb
    assert cpu_compat.apply_cpu_compat(force=True) == names


def test_the_optimizer_wrappers_are_not_wrapped_twice():
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.optimizer import optimizer as moptimizer

    before = (moptimizer.Float16OptimizerWithFloat16Params.__init__, distrib_optimizer.DistributedOptimizer.__init__)
    cpu_compat.patch_optimizer_type_checks()
    after = (moptimizer.Float16OptimizerWithFloat16Params.__init__, distrib_optimizer.DistributedOptimizer.__init__)
    assert before == after


# ------------------------------------------------------------------------------ one test per patch


def test_rng_tracker_fork_switches_to_and_restores_cpu_states():
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123)  # asserts "Torch not compiled with CUDA" unpatched
    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert type(tracker).__name__ == "CpuRNGStatesTracker"

    torch.manual_seed(7)
    outside_before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outside_before)  # the default stream is untouched
    with tracker.fork():
        second = torch.rand(4)
    # The model-parallel stream is seeded with seed + 2718 + tp_rank and continues across forks.
    reference = torch.Generator().manual_seed(123 + 2718)
    assert torch.equal(first, torch.rand(4, generator=reference))
    assert torch.equal(second, torch.rand(4, generator=reference))
    assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(7)))

    saved = tracker.get_states()
    with tracker.fork():
        third = torch.rand(4)
    tracker.set_states(saved)
    with tracker.fork():
        assert torch.equal(torch.rand(4), third)  # get_states/set_states round-trip (checkpoint resume)
    with pytest.raises(Exception, match="already exists"):
        tracker.add("model-parallel-rng", 999)


def test_rope_forward_stays_on_cpu_with_the_right_angles():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, rotary_base=10000, use_cpu_initialization=True)
    emb = rope(5)  # [s, 1, 1, dim]; unpatched get_emb moves inv_freq to torch.cuda.current_device()
    assert emb.shape == (5, 1, 1, 8) and emb.device.type == "cpu"
    position = torch.arange(5, dtype=torch.float32)[:, None]
    inv_freq = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float32) / 8)  # [dim/2]
    expected = torch.cat([position * inv_freq, position * inv_freq], dim=-1)  # rotate-half layout
    torch.testing.assert_close(emb[:, 0, 0, :], expected)
    assert rope.inv_freq.device.type == "cpu"


def test_global_memory_buffer_allocates_on_cpu_and_reuses_storage():
    from megatron.core import parallel_state

    buffer = parallel_state.get_global_memory_buffer()
    big = buffer.get_tensor((4, 6), torch.float32, "cpu-compat-test")
    assert big.shape == (4, 6) and big.device.type == "cpu" and not big.requires_grad
    small = buffer.get_tensor((2, 3), torch.float32, "cpu-compat-test")
    assert small.data_ptr() == big.data_ptr()  # a smaller request is a view of the same scratch space
    grown = buffer.get_tensor((10, 10), torch.float32, "cpu-compat-test")
    assert grown.numel() == 100 and grown.device.type == "cpu"
    other_dtype = buffer.get_tensor((2, 3), torch.bfloat16, "cpu-compat-test")
    assert other_dtype.dtype == torch.bfloat16


def test_causal_mask_is_built_on_cpu_by_the_softmax_fallback():
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func, get_default_causal_mask

    mask = get_default_causal_mask(3)
    assert mask.device.type == "cpu"
    assert mask.tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    softmax = FusedScaleMaskSoftmax(False, False, AttnMaskType.causal, False, attention_mask_func, True, None)
    probs = softmax(torch.zeros(1, 1, 4, 4), None)  # [b, heads, sq, sk]; mask=None -> default causal mask
    expected = torch.tensor([[1 / (i + 1) if j <= i else 0.0 for j in range(4)] for i in range(4)])
    torch.testing.assert_close(probs[0, 0], expected)


def test_schedules_no_pipelining_runs_forward_and_backward():
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = tiny_gpt()
    batches = [tiny_batch(1), tiny_batch(2)]

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [b, s]

        def loss_func(output):
            loss = output.float().sum()
            return loss, torch.tensor(output.numel(), dtype=torch.int), {"lm loss": loss.detach()}

        return per_token, loss_func

    model.config.calculate_per_token_loss = True
    forward_backward = get_forward_backward_func()  # schedules allocate torch.zeros(device="cuda") unpatched
    reports = forward_backward(forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
                               num_microbatches=2, seq_length=SEQ, micro_batch_size=MICRO_BATCH,
                               forward_only=False)
    assert len(reports) == 2
    with torch.no_grad():
        expected = [lm_loss(model, b).item() * MICRO_BATCH * SEQ for b in batches]
    assert [r["lm loss"].item() for r in reports] == pytest.approx(expected, rel=1e-5)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_ddp_grad_buffers_and_optimizer_step_match_plain_autograd():
    model = tiny_gpt()
    reference = tiny_gpt()
    reference.load_state_dict(model.state_dict())
    batch = tiny_batch(3)
    lm_loss(reference, batch).backward()
    expected_grads = {name: p.grad.clone() for name, p in reference.named_parameters()}

    ddp = ddp_wrap(model)  # grad buffers on torch.cuda.current_device() unpatched
    assert all(b.grad_data.device.type == "cpu" for b in ddp.buffers)
    optimizer = megatron_optimizer(ddp, optimizer="sgd", lr=0.5, sgd_momentum=0.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    lm_loss(ddp, batch).backward()
    ddp.finish_grad_sync()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.main_grad, expected_grads[name], rtol=1e-5, atol=1e-7)
    success, grad_norm, _ = optimizer.step()
    assert success and math.isfinite(grad_norm)
    for name, param in model.named_parameters():  # plain SGD: p <- p - lr * grad
        torch.testing.assert_close(param.detach(), before[name] - 0.5 * expected_grads[name], rtol=1e-5, atol=1e-6)


def test_tensor_parallel_helpers_allocate_on_cpu():
    from megatron.core import tensor_parallel

    x = torch.arange(6, dtype=torch.float32)
    chunk = tensor_parallel.split_tensor_into_1d_equal_chunks(x, new_buffer=True)  # torch.cuda.current_device()
    assert chunk.device.type == "cpu" and torch.equal(chunk, x)
    assert chunk.data_ptr() != x.data_ptr()
    gathered = tensor_parallel.gather_split_1d_tensor(chunk)
    assert gathered.device.type == "cpu" and torch.equal(gathered, x)
    # TP=1 bypasses the collective; the real gather runs with two ranks below.
    assert torch.equal(tensor_parallel.gather_from_tensor_model_parallel_region(x), x)


def test_tensor_parallel_gather_across_two_ranks(tmp_path):
    out = tmp_path / "gather.json"
    torchrun(SCRIPTS / "cpu_compat_tp_gather.py", 2, str(out), timeout=180)
    result = json.loads(out.read_text())
    assert result == {"0": {"forward": True, "backward": True}, "1": {"forward": True, "backward": True}}


def test_dist_checkpointing_save_and_load_round_trip(tmp_path):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    weight = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    bias = torch.arange(3, dtype=torch.bfloat16)
    to_save = {
        "weight": ShardedTensor.from_rank_offsets("layer.weight", weight.clone()),
        "bias": ShardedTensor.from_rank_offsets("layer.bias", bias.clone()),
        "step": 17,
    }
    dist_checkpointing.save(to_save, str(tmp_path))  # torch.cuda.synchronize + device="cuda" staging unpatched
    assert (tmp_path / "metadata.json").exists()
    template = {
        "weight": ShardedTensor.from_rank_offsets("layer.weight", torch.zeros(4, 3)),
        "bias": ShardedTensor.from_rank_offsets("layer.bias", torch.zeros(3, dtype=torch.bfloat16)),
    }
    loaded = dist_checkpointing.load(template, str(tmp_path))
    assert torch.equal(loaded["weight"], weight) and loaded["weight"].device.type == "cpu"
    assert torch.equal(loaded["bias"], bias) and loaded["bias"].dtype == torch.bfloat16
    assert dist_checkpointing.load_common_state_dict(str(tmp_path))["step"] == 17


def test_clip_grads_scales_by_the_total_norm():
    from megatron.core.optimizer import clip_grads

    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([3.0, 4.0])  # a CPU FloatTensor: the unpatched version asserts torch.cuda.*
    clip_grads.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=5.0)
    torch.testing.assert_close(param.grad, torch.tensor([0.6, 0.8]), rtol=1e-5, atol=1e-6)
    clip_grads.clip_grad_by_total_norm_fp32(param, max_norm=10.0, total_norm=1.0)  # under the limit: no-op
    torch.testing.assert_close(param.grad, torch.tensor([0.6, 0.8]), rtol=1e-5, atol=1e-6)


def test_optimizer_step_with_clip_grad_returns_the_true_grad_norm():
    model = tiny_gpt()
    ddp = ddp_wrap(model)
    optimizer = megatron_optimizer(ddp, clip_grad=1.0)
    batch = tiny_batch(4)
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    lm_loss(ddp, batch).backward()
    ddp.finish_grad_sync()
    expected_norm = torch.sqrt(sum((p.main_grad.double() ** 2).sum() for p in model.parameters())).item()
    success, grad_norm, _ = optimizer.step()
    assert success and math.isfinite(grad_norm) and grad_norm > 0
    assert grad_norm == pytest.approx(expected_norm, rel=1e-4)
    loss_before = lm_loss(ddp, batch).item()
    for _ in range(3):
        train_step(ddp, optimizer, batch)
    assert lm_loss(ddp, batch).item() < loss_before


@pytest.mark.parametrize("distributed_optimizer", [False, True], ids=["float16-optimizer", "distributed-optimizer"])
def test_optimizer_type_checks_accept_cpu_bf16_params(distributed_optimizer):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    model = tiny_gpt(bf16=True)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    # Linear weights are bf16; the local spec's torch norms stay fp32 (the optimizer sorts both kinds).
    assert dtypes["decoder.layers.0.self_attention.linear_qkv.weight"] == torch.bfloat16
    assert dtypes["decoder.final_layernorm.weight"] == torch.float32
    ddp = ddp_wrap(model, distributed_optimizer=distributed_optimizer)
    # Unpatched, both constructors raise TypeError: "Wrapped parameters must be one of torch.cuda.FloatTensor..."
    optimizer = megatron_optimizer(ddp, bf16=True, params_dtype=torch.bfloat16,
                                   use_distributed_optimizer=distributed_optimizer, clip_grad=1.0)
    inner = inner_optimizers(optimizer)
    expected_type = DistributedOptimizer if distributed_optimizer else Float16OptimizerWithFloat16Params
    assert len(inner) == 1 and isinstance(inner[0], expected_type)
    assert torch.ones(1).type() == "torch.FloatTensor"  # the type-name shim is gone after construction

    before = [p.detach().clone() for p in model.parameters()]
    batch = tiny_batch(5)
    loss_before = lm_loss(ddp, batch).item()
    for _ in range(3):
        _, (success, grad_norm, _) = train_step(ddp, optimizer, batch)
        assert success and math.isfinite(grad_norm) and grad_norm > 0
    after = list(model.parameters())
    assert [p.dtype for p in after] == list(dtypes.values())
    assert all(not torch.equal(b, a.detach()) for b, a in zip(before, after) if a.dtype == torch.bfloat16)
    assert lm_loss(ddp, batch).item() < loss_before


# ------------------------------------------------------------------------- subprocess checks


_CUDA_REPORTED_AVAILABLE = textwrap.dedent("""
    import json, sys
    import torch
    torch.cuda.is_available = lambda: True     # what a GPU host reports

    from megatron_ddk.platform import cpu_compat

    names = cpu_compat.apply_cpu_compat()

    from megatron.core import utils as mutils
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.embeddings import rotary_pos_embedding as rope
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer as moptimizer
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as tutils
    import importlib

    proxied = [m for group in cpu_compat.PROXIED_MODULES.values() for m in group
               if type(importlib.import_module(m).torch).__name__ == "_CpuTorchProxy"]
    untouched = {
        "names": names,
        "proxied": proxied,
        "rng_tracker": not hasattr(mrandom, "CpuRNGStatesTracker"),
        "rope": rope.RotaryEmbedding.get_emb.__module__ == rope.__name__,
        "global_memory_buffer": mutils.GlobalMemoryBuffer.get_tensor.__module__ == mutils.__name__,
        "causal_mask": tutils.get_default_causal_mask.__module__ == tutils.__name__
                       and fused_softmax.get_default_causal_mask is tutils.get_default_causal_mask,
        "clip_grads": clip_grads.clip_grad_by_total_norm_fp32.__module__ == clip_grads.__name__
                      and moptimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32,
        "optimizer_type_checks": not hasattr(moptimizer.Float16OptimizerWithFloat16Params.__init__, "_cpu_compat")
                                 and not hasattr(distrib_optimizer.DistributedOptimizer.__init__, "_cpu_compat"),
    }

    # On this CUDA-less torch the unpatched megatron-core calls fail: the patches are needed.
    failures = {}
    def fails(name, call):
        try:
            call()
        except (AssertionError, RuntimeError) as err:
            failures[name] = type(err).__name__
    fails("rope", lambda: rope.RotaryEmbedding(kv_channels=8, rotary_percent=1.0,
                                               use_cpu_initialization=True).get_emb(4))
    fails("global_memory_buffer", lambda: mutils.GlobalMemoryBuffer().get_tensor((2,), torch.float32, "x"))
    fails("causal_mask", lambda: tutils.get_default_causal_mask(3))
    p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.ones(2)
    fails("clip_grads", lambda: clip_grads.clip_grad_by_total_norm_fp32([p], 1.0, 5.0))
    json.dump({"untouched": untouched, "failures": failures}, sys.stdout)
""")


def test_apply_is_a_no_op_when_cuda_is_reported_available():
    result = json.loads(python("-c", _CUDA_REPORTED_AVAILABLE, timeout=120).stdout.strip().splitlines()[-1])
    untouched = result["untouched"]
    assert untouched.pop("names") == []
    assert untouched.pop("proxied") == []
    assert all(untouched.values()), untouched
    assert set(result["failures"]) == {"rope", "global_memory_buffer", "causal_mask", "clip_grads"}


_OTHER_VERSION = textwrap.dedent("""
    import importlib.metadata, sys
    real = importlib.metadata.version
    importlib.metadata.version = lambda name: "{found}" if name == "megatron-core" else real(name)
    try:
        import megatron_ddk
    except ImportError as err:
        print("ImportError:", err)
        sys.exit(0)
    print("imported")
""")


@pytest.mark.parametrize("found", ["0.17.0", "0.16.0"])
def test_import_refuses_another_megatron_core_version(found):
    out = python("-c", _OTHER_VERSION.format(found=found), timeout=60).stdout
    assert out.startswith("ImportError:"), out
    assert f"needs megatron-core==0.16.1, found {found}" in out
    assert "pip install megatron-core==0.16.1" in out


def test_import_says_how_to_install_a_missing_megatron_core():
    code = _OTHER_VERSION.replace(
        'lambda name: "{found}" if name == "megatron-core" else real(name)',
        "lambda name: (_ for _ in ()).throw(importlib.metadata.PackageNotFoundError(name))")
    out = python("-c", code, timeout=60).stdout
    assert out.startswith("ImportError: megatron-core is not installed"), out
    assert "megatron-core==0.16.1" in out
