"""What autograd keeps from one DistillationModel forward: the teacher must add nothing (it runs under no_grad).

Writes JSON: bytes of tensors saved for backward (parameters excluded) for the student alone and for
student + teacher, with and without the student's full recomputation, and whether the teacher's logits
carry an autograd graph.
"""

import json
import sys
from functools import partial

import torch


def saved_activation_bytes(run, parameters) -> tuple[int, object]:
    """Bytes of the distinct non-parameter tensors autograd saves for backward while ``run()`` executes."""
    params = {p.untyped_storage().data_ptr() for p in parameters}
    seen: dict[int, int] = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run()
    return sum(seen.values()), output


def main() -> None:
    from megatron_ddk.config import ModelConfig, ParallelConfig, PrecisionConfig, RecomputeConfig
    from megatron_ddk.data.tokenizer import padded_vocab_size
    from megatron_ddk.distill.model import DistillationModel
    from megatron_ddk.models.gpt import build_gpt_model
    from megatron_ddk.platform.distributed import ParallelLayout, destroy, initialize, set_seed

    pg = initialize(ParallelLayout(world_size=1))
    set_seed(1, pg)
    student_cfg = ModelConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        vocab_size=500,
        max_position_embeddings=32,
    )
    teacher_cfg = ModelConfig(
        num_layers=4,
        hidden_size=96,
        num_attention_heads=4,
        ffn_hidden_size=192,
        vocab_size=500,
        max_position_embeddings=32,
    )
    tokens = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(32)[None].expand(2, -1)
    results = {}
    for name, recompute in (
        ("plain", None),
        ("full", RecomputeConfig(granularity="full", method="uniform", num_layers=1)),
    ):
        build = dict(pre_process=True, post_process=True)
        rows = dict(padded_vocab_size=padded_vocab_size(500, 1), pg=pg)
        student = build_gpt_model(
            student_cfg, ParallelConfig(), PrecisionConfig(), recompute=recompute, **build, **rows
        )
        teacher = build_gpt_model(teacher_cfg, ParallelConfig(), PrecisionConfig(), **build, **rows)
        model = DistillationModel(student, teacher, **build)
        model.train()
        params = [*student.parameters(), *teacher.parameters()]
        model.run_teacher = False
        alone, _ = saved_activation_bytes(partial(model, tokens, positions, None), params)
        model.run_teacher = True
        both, (student_logits, teacher_logits) = saved_activation_bytes(
            partial(model, tokens, positions, None), params
        )
        results[name] = {
            "student_alone": alone,
            "student_and_teacher": both,
            "teacher_logits_requires_grad": teacher_logits.requires_grad,
            "teacher_logits_grad_fn": teacher_logits.grad_fn is not None,
            "student_logits_grad_fn": student_logits.grad_fn is not None,
            "teacher_training_mode": teacher.training,
            "teacher_recompute": teacher.config.recompute_granularity,
        }
    destroy()
    with open(sys.argv[1], "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main()
