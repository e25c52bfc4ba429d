"""Exercise, on CPU, each megatron-core call that one cpu_compat patch fixes; write {patch: "ok" | error}."""

import json
import sys
import tempfile
import traceback

import torch


def tiny_gpt(recompute=None, **moe):
    from megatron_ddk.config import ModelConfig, ParallelConfig, PrecisionConfig
    from megatron_ddk.data.tokenizer import padded_vocab_size
    from megatron_ddk.models.gpt import build_gpt_model
    from megatron_ddk.platform.distributed import ParallelLayout, initialize

    cfg = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=64,
        vocab_size=100,
        max_position_embeddings=16,
        **moe,
    )
    return build_gpt_model(
        cfg,
        ParallelConfig(),
        PrecisionConfig(),
        pre_process=True,
        post_process=True,
        padded_vocab_size=padded_vocab_size(cfg.vocab_size, 1, cfg.make_vocab_size_divisible_by),
        pg=initialize(ParallelLayout(world_size=1)),
        recompute=recompute,
    )


def batch():
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    return tokens, torch.arange(16)[None].expand(2, -1)


def check_rng_tracker():
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123)
    before = torch.get_rng_state()
    with tensor_parallel.get_cuda_rng_tracker().fork():
        inside = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the default generator"
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert not torch.equal(torch.rand(3), inside), "the tracked stream advances"


def check_rope():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    emb = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)(16)
    assert emb.device.type == "cpu" and emb.shape[0] == 16


def check_rope_context_parallel():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    class Rank1Of2:  # the two methods megatron-core asks of a CP group
        size, rank = staticmethod(lambda: 2), staticmethod(lambda: 1)

    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)
    whole, mine = rope(16), rope(16, cp_group=Rank1Of2())
    assert mine.device.type == "cpu" and torch.equal(mine, torch.cat([whole[4:8], whole[8:12]]))


def check_global_memory_buffer():
    from megatron.core import parallel_state

    buf = parallel_state.get_global_memory_buffer().get_tensor((4, 4), torch.float32, "test")
    assert buf.device.type == "cpu"


def check_causal_mask():
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(8)
    assert mask.device.type == "cpu" and mask[0, 1] and not mask[1, 0]


def check_schedules():
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = tiny_gpt()
    tokens, pos = batch()

    def step(data, m):
        out = m(tokens, pos, None, labels=tokens)
        return out, lambda o: (o.sum(), torch.tensor(o.numel(), dtype=torch.int), {"x": o.sum().detach()})

    losses = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter([0, 0]),
        model=[model],
        num_microbatches=2,
        seq_length=16,
        micro_batch_size=2,
        forward_only=True,
    )
    assert len(losses) == 2


def _ddp_and_optimizer(clip_grad=0.0, bf16=False, distributed_optimizer=False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = tiny_gpt()
    if bf16:
        model = model.to(torch.bfloat16)
        model.config.bf16, model.config.params_dtype = True, torch.bfloat16
    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer
        ),
        model,
    )
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-3,
            clip_grad=clip_grad,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_distributed_optimizer=distributed_optimizer,
        ),
        [ddp],
    )
    tokens, pos = batch()
    ddp.zero_grad_buffer()
    ddp(tokens, pos, None, labels=tokens).float().mean().backward()
    ddp.finish_grad_sync()
    before = [p.detach().clone() for p in model.parameters()]
    ok, grad_norm, _ = opt.step()
    assert ok and any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    return grad_norm


def check_ddp_and_optimizer():
    _ddp_and_optimizer()


def check_tensor_parallel():
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    x = torch.randn(2, 3)
    assert torch.equal(gather_from_tensor_model_parallel_region(x), x)


def check_activation_recompute():
    from megatron_ddk.config import RecomputeConfig

    tokens, positions = batch()
    grads = []
    for recompute in (None, RecomputeConfig(granularity="full", method="uniform", num_layers=1)):
        torch.manual_seed(3)
        model = tiny_gpt(recompute=recompute)
        model(tokens, positions, None).float().square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def check_dist_checkpointing():
    from megatron.core import dist_checkpointing

    model = tiny_gpt()
    with tempfile.TemporaryDirectory() as tmp:
        dist_checkpointing.save(model.sharded_state_dict(), tmp)
        other = tiny_gpt()
        with torch.no_grad():
            for p in other.parameters():
                p.zero_()
        other.load_state_dict(dist_checkpointing.load(other.sharded_state_dict(), tmp))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


def check_moe():
    """Router (weight moved to "cuda" at each forward), all-gather dispatcher, sequential experts, the
    shared expert's gate and the load-balancing loss's backward, then a dist_checkpointing round trip."""
    from megatron.core import dist_checkpointing

    moe = dict(
        num_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=16,
        moe_shared_expert_intermediate_size=24,
        moe_shared_expert_gate=True,
        moe_aux_loss_coeff=0.01,
        add_bias_linear=False,
    )
    model = tiny_gpt(**moe)
    tokens, pos = batch()
    model(tokens, pos, None, labels=tokens).float().mean().backward()
    router = model.decoder.layers[0].mlp.router.weight
    assert router.device.type == "cpu" and router.grad is not None and torch.isfinite(router.grad).all()
    with tempfile.TemporaryDirectory() as tmp:
        dist_checkpointing.save(model.sharded_state_dict(), tmp)
        other = tiny_gpt(**moe)
        other.load_state_dict(dist_checkpointing.load(other.sharded_state_dict(), tmp))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


def check_clip_grads():
    grad_norm = _ddp_and_optimizer(clip_grad=1.0)
    assert grad_norm is not None and torch.isfinite(torch.as_tensor(grad_norm))


def check_optimizer_type_checks():
    _ddp_and_optimizer(bf16=True)
    _ddp_and_optimizer(distributed_optimizer=True)


CHECKS = {name[len("check_") :]: fn for name, fn in globals().items() if name.startswith("check_")}


def main() -> None:
    from megatron_ddk.platform.cpu_compat import PATCHES
    from megatron_ddk.platform.distributed import ParallelLayout, destroy, initialize, set_seed

    pg = initialize(ParallelLayout(world_size=1))
    set_seed(1, pg)
    results = {"_patches": sorted(PATCHES)}
    for name, check in CHECKS.items():
        try:
            check()
            results[name] = "ok"
        except Exception:  # report every failure, not just the first
            results[name] = traceback.format_exc()
    destroy()
    with open(sys.argv[1], "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main()
