"""Copy a checkpoint's model with one NaN weight (a broken teacher): poison_checkpoint.py SRC_ROOT DST_ROOT."""

import dataclasses
import sys

import torch


def main() -> None:
    from megatron_ddk.checkpointing import load_model_state, read_metadata, save_checkpoint
    from megatron_ddk.config import ParallelConfig, PrecisionConfig
    from megatron_ddk.data.tokenizer import padded_vocab_size
    from megatron_ddk.models.gpt import build_gpt_model
    from megatron_ddk.platform.distributed import ParallelLayout, destroy, initialize, set_seed

    src, dst = sys.argv[1:3]
    pg = initialize(ParallelLayout(world_size=1))
    set_seed(0, pg)
    meta = read_metadata(src)
    rows = padded_vocab_size(meta.model.vocab_size, 1, meta.model.make_vocab_size_divisible_by)
    model = build_gpt_model(
        meta.model,
        ParallelConfig(),
        PrecisionConfig(),
        pre_process=True,
        post_process=True,
        padded_vocab_size=rows,
        pg=pg,
        initialize_weights=False,
    )
    load_model_state(src, model)
    with torch.no_grad():
        model.decoder.final_layernorm.weight[0] = float("nan")
    save_checkpoint(
        dst, dataclasses.replace(meta, has_optimizer=False), {"model": model.sharded_state_dict()}
    )
    destroy()


if __name__ == "__main__":
    main()
