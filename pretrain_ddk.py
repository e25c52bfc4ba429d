"""Distil a teacher GPT into a student with DDK on megatron-core (or run the CPT / KD baselines).

    torchrun --nproc-per-node 8 pretrain_ddk.py --ddk-mode ddk --teacher-load TEACHER ... (see README.md)
"""

from __future__ import annotations

import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    from megatron_ddk.arguments import ArgumentError, parse_run
    from megatron_ddk.checkpointing import CheckpointError
    from megatron_ddk.config import SetupError
    from megatron_ddk.data.domains import DataConfigError
    from megatron_ddk.errors import UserError

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg, tokenizer = parse_run(argv, world_size=world_size)
        from megatron_ddk.training.trainer import Trainer

        trainer = Trainer(cfg, tokenizer)
    except (UserError, ArgumentError, CheckpointError, DataConfigError, SetupError, FileNotFoundError, ValueError) as err:
        if os.environ.get("MEGATRON_DDK_TRACEBACK"):
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            message = str(err).replace("\n", "\n  ")
            print(f"pretrain_ddk.py: error: {message}", file=sys.stderr, flush=True)
        else:
            # every rank found the same problem; give rank 0 time to report it before torchrun
            # tears the job down on the first exit
            time.sleep(5)
        return 2
    try:
        trainer.train()
    finally:
        trainer.close()
        from megatron_ddk.platform.distributed import destroy

        destroy()
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing's writer spawns processes
    sys.exit(main())
