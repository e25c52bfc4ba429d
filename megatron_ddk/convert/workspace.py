"""What both converters do around the weight mapping: build the whole model in a one-process world,
refuse a non-empty output directory, and publish a finished conversion atomically."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ddk.checkpointing import publish_directory
from megatron_ddk.config import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_ddk.data.tokenizer import padded_vocab_size
from megatron_ddk.models.gpt import build_gpt_model
from megatron_ddk.models.hf_mapping import HFConversionError
from megatron_ddk.platform.distributed import ParallelLayout, destroy, initialize, set_seed


@contextlib.contextmanager
def single_process_model(model_cfg: ModelConfig, dtype: torch.dtype, *, purpose: str):
    """The whole model at TP1/PP1 (weights uninitialised) in a one-process world, for the converters.

    Starts and ends that world unless the caller already has one (tests convert in-process);
    ``purpose`` finishes the error message for a multi-process launch.
    """
    owns_world = not dist.is_initialized()
    pg = initialize(ParallelLayout(world_size=1))
    try:
        if dist.get_world_size() != 1:
            raise HFConversionError(f"run the converter as a single process (no torchrun): {purpose}")
        set_seed(0, pg)
        vocab_rows = padded_vocab_size(model_cfg.vocab_size, 1, model_cfg.make_vocab_size_divisible_by)
        yield build_gpt_model(
            model_cfg,
            ParallelConfig(),
            PrecisionConfig(bf16=dtype == torch.bfloat16),
            padded_vocab_size=vocab_rows,
            pg=pg,
            pre_process=True,
            post_process=True,
            initialize_weights=False,
        )
    finally:
        if owns_world:
            destroy()


def check_output_directory(path: Path, overwrite: bool, *, flag: str) -> None:
    """A converter's output must be a new or empty directory, or ``--overwrite`` must be given."""
    if path.exists() and not path.is_dir():
        raise HFConversionError(f"{flag} {path} is a file; give a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise HFConversionError(f"{flag} {path} exists and is not empty; pass --overwrite to replace it")


def publish_output(staging: Path, output: Path, overwrite: bool, *, flag: str) -> None:
    """Move a finished conversion into place; an old ``output`` is removed only after the swap."""
    check_output_directory(output, overwrite, flag=flag)  # checked again: it may have appeared meanwhile
    publish_directory(staging, output)
