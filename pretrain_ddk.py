"""Distil a teacher GPT into a student with DDK on megatron-core (or run the CPT / KD baselines).

torchrun --nproc-per-node 8 pretrain_ddk.py --ddk-mode ddk --teacher-load TEACHER ... (see README.md)
"""

from __future__ import annotations

import os
import sys


def _report(err: Exception) -> int:
    """One line on stderr for a ``UserError`` (exit code 2); ``MEGATRON_DDK_TRACEBACK=1`` re-raises it."""
    if os.environ.get("MEGATRON_DDK_TRACEBACK"):
        raise err
    # every rank reports what it found (torchrun stops the job at the first exit, so no rank can
    # count on another to print); the rank prefix tells the copies apart
    rank = int(os.environ.get("RANK", "0"))
    prefix = "" if rank == 0 else f"[rank {rank}] "
    message = str(err).replace("\n", "\n  ")
    print(f"{prefix}pretrain_ddk.py: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    from megatron_ddk.errors import UserError
    from megatron_ddk.platform.startup import prepare_process

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        prepare_process()
        from megatron_ddk.arguments import parse_run
        from megatron_ddk.training.trainer import Trainer

        cfg, tokenizer = parse_run(argv, world_size=world_size)
        trainer = Trainer(cfg, tokenizer)
    except UserError as err:
        return _report(err)
    from megatron_ddk.platform.distributed import destroy

    status = 0
    try:
        trainer.train()
    except UserError as err:  # e.g. a non-finite loss: every rank raises the same one-line error
        status = _report(err)
    finally:
        try:
            trainer.close()  # waits for a background (--async-save) checkpoint still being written
        except UserError as err:  # that write failed: one line too, whatever ended the run
            status = _report(err)
        finally:
            destroy()
    return status


if __name__ == "__main__":  # the guard matters: dist_checkpointing's writer spawns processes
    sys.exit(main())
