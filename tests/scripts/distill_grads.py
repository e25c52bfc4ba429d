"""Train a few KD iterations through the real Trainer, then check where gradients went (run under torchrun)."""

import json
import os
import sys

import torch


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    from megatron_ddk.arguments import parse_run
    from megatron_ddk.checkpointing import load_model_state
    from megatron_ddk.data.tokenizer import padded_vocab_size
    from megatron_ddk.models.gpt import build_gpt_model
    from megatron_ddk.platform.distributed import destroy
    from megatron_ddk.training.trainer import Trainer

    cfg, tokenizer = parse_run(argv, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    trainer = Trainer(cfg, tokenizer)
    teacher = trainer.unwrapped.teacher
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    student_before = {name: p.detach().clone() for name, p in trainer.student.named_parameters()}
    trainer.train()
    # a fresh copy of the teacher from its checkpoint: the trained-with teacher must still equal it
    t_model = trainer.teacher_metadata.model
    fresh = build_gpt_model(
        t_model,
        cfg.parallel,
        cfg.precision,
        pg=trainer.pg,
        padded_vocab_size=padded_vocab_size(
            t_model.vocab_size, cfg.parallel.tensor_model_parallel_size, t_model.make_vocab_size_divisible_by
        ),
        pre_process=True,
        post_process=True,
        initialize_weights=False,
    )
    load_model_state(cfg.distill.teacher_load, fresh)
    fresh_params = dict(fresh.named_parameters())
    result = {
        "student_params": len(student_before),
        "student_with_grad": sum(
            1
            for p in trainer.student.parameters()
            if getattr(p, "main_grad", None) is not None and p.main_grad.abs().sum() > 0
        ),
        "student_changed": sum(
            1 for n, p in trainer.student.named_parameters() if not torch.equal(p, student_before[n])
        ),
        "teacher_params": len(before),
        "teacher_requires_grad": sum(p.requires_grad for p in teacher.parameters()),
        "teacher_with_grad": sum(
            p.grad is not None or getattr(p, "main_grad", None) is not None for p in teacher.parameters()
        ),
        "teacher_unchanged": all(torch.equal(p, before[n]) for n, p in teacher.named_parameters()),
        "teacher_equals_checkpoint": all(
            torch.equal(p, fresh_params[n]) for n, p in teacher.named_parameters()
        ),
        "teacher_training_mode": teacher.training,
        "optimizer_params": sum(len(g["params"]) for g in trainer.optimizer.param_groups),
    }
    trainer.close()
    destroy()
    with open(out, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
