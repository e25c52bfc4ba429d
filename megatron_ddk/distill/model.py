"""Student and frozen teacher as one pipeline stage, so megatron-core's schedules drive both.

Shapes: ``[s, b, h]`` = sequence x micro-batch x hidden (megatron-core's layout between stages);
``[b, s, v]`` = logits on the last stage, ``v`` = this TP rank's vocabulary shard.

With pipeline parallelism every stage holds the same slice of both models. A non-last stage sends
``[s, b, h_student + h_teacher]`` (the two hidden states concatenated on the last dim); the next
stage splits it in ``set_input_tensor``. ``pipeline_shape_adjuster`` tells the 1F1B schedule about
the wider tensor. The teacher is kept outside the module tree on purpose: DDP, the optimizer,
``.train()`` and checkpoints only ever see the student.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core.transformer.module import MegatronModule


class DistillationModel(MegatronModule):
    """One pipeline stage of the student, plus (optionally) the same stage of a frozen teacher."""

    def __init__(
        self,
        student: MegatronModule,
        teacher: MegatronModule | None,
        *,
        pre_process: bool,
        post_process: bool,
    ):
        super().__init__(config=student.config)
        self.student = student
        self.model_type = student.model_type  # the schedules look it up on the outermost module
        self.pre_process = pre_process
        self.post_process = post_process
        self.run_teacher = teacher is not None
        """False for student-only passes (DDK's periodic validation): the teacher is skipped entirely."""
        object.__setattr__(self, "_teacher", teacher)  # not a submodule: invisible to DDP/optimizer/ckpt
        if teacher is not None:
            freeze(teacher)

    def __getattr__(self, name: str):
        """Anything else (e.g. ``share_embeddings_and_output_weights``, which megatron-core's grad
        finalisation looks up on the outermost module) is the student's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["student"], name)

    @property
    def teacher(self) -> MegatronModule | None:
        return self._teacher

    @property
    def teacher_active(self) -> bool:
        return self._teacher is not None and self.run_teacher

    def set_input_tensor(self, input_tensor) -> None:
        tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor
        if not self.teacher_active or tensor is None:
            self.student.set_input_tensor(tensor)
            return
        h_student = self.student.config.hidden_size
        self.student.set_input_tensor(tensor[..., :h_student])
        self._teacher.set_input_tensor(tensor[..., h_student:])

    def forward(self, input_ids, position_ids, attention_mask=None):
        """Last stage: ``(student_logits [b, s, v], teacher_logits or None)``; else hidden ``[s, b, h (+ h_t)]``."""
        student_out = self.student(input_ids, position_ids, attention_mask)
        teacher_out = None
        if self.teacher_active:
            with torch.no_grad():
                teacher_out = self._teacher(input_ids, position_ids, attention_mask)
        if self.post_process:
            return student_out, teacher_out
        if teacher_out is None:
            return student_out
        return torch.cat([student_out, teacher_out.to(student_out.dtype)], dim=-1)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        return self.student.sharded_state_dict(
            prefix=prefix, sharded_offsets=sharded_offsets, metadata=metadata
        )


def freeze(model: torch.nn.Module) -> None:
    """Eval mode (no dropout) and no gradients, for good."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)


def pipeline_shape_adjuster(teacher_hidden_size: int) -> Callable:
    """``adjust_tensor_shapes_fn`` for megatron-core's 1F1B schedule: widen p2p tensors by the teacher."""

    def adjust(recv_shapes, send_shapes):
        widen = lambda shapes: [(*shape[:-1], shape[-1] + teacher_hidden_size) for shape in shapes]  # noqa: E731
        return widen(recv_shapes), widen(send_shapes)

    return adjust
