"""Hugging Face LLaMA (incl. Llama 3.x RoPE scaling) / Mistral / Qwen2 / Qwen3 and the MoE families Mixtral /
Qwen2-MoE / Qwen3-MoE (safetensors) -> a megatron-ddk checkpoint (TP1/PP1/EP1, reshards on load).

    python tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-7B --save ckpt/teacher [--bf16 | --fp32] \
        [--vocab-size-from-tokenizer] [--overwrite]

Everything that can be checked from config.json and the safetensors headers (architecture, refused
options, missing shards, missing/unexpected tensors, shapes) is checked before any weight is read.
The model is built once without random init, then the shards are streamed tensor by tensor into
their slices, so peak memory is about one model plus one tensor. The result is written next to
--save and renamed into place at the end: an existing --save is replaced (with --overwrite) only
once the new checkpoint is complete. Use it as --teacher-load (or --load with --finetune) at any
TP/PP/EP: dist_checkpointing reshards when loading.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401
import torch

from megatron_ddk.errors import UserError
from megatron_ddk.models.hf_mapping import HFConversionError
from megatron_ddk.platform.startup import prepare_process

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--hf-dir", required=True, type=Path, help="HF model directory (config.json + safetensors)"
    )
    parser.add_argument("--save", required=True, type=Path, help="checkpoint root to write")
    dtype = parser.add_mutually_exclusive_group()
    dtype.add_argument("--bf16", action="store_true", help="store bfloat16 weights")
    dtype.add_argument("--fp32", action="store_true", help="store float32 weights")
    parser.add_argument(
        "--vocab-size-from-tokenizer",
        action="store_true",
        help="keep only the embedding/output rows of tokenizer.json's tokens (HF configs often "
        "round vocab_size up), so the model pads like a student built from that tokenizer",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --save")
    return parser.parse_args(argv)


def target_dtype(args: argparse.Namespace, hf_dtype: str | None) -> tuple[torch.dtype, str | None]:
    """--bf16/--fp32, else the HF torch_dtype; float16 becomes float32 (lossless), with a note."""
    if args.bf16:
        return torch.bfloat16, None
    if args.fp32 or hf_dtype is None:
        return torch.float32, None
    if hf_dtype == "bfloat16":
        return torch.bfloat16, None
    if hf_dtype == "float16":
        return (
            torch.float32,
            "torch_dtype float16 stored as float32 (lossless); pass --bf16 to halve the size",
        )
    return torch.float32, None


def tokenizer_record(hf_dir: Path, vocab_size: int) -> tuple[dict, str | None]:
    """The tokenizer identity stored in the checkpoint (compared with the student's at KD time)."""
    unknown = {"type": None, "vocab_size": vocab_size, "sha256": None}
    if not (hf_dir / "tokenizer.json").is_file():
        return unknown, (
            f"no tokenizer.json in {hf_dir}: the checkpoint records no tokenizer identity, so a KD run "
            "cannot check that teacher and student share a vocabulary"
        )
    from megatron_ddk.data.tokenizer import build_tokenizer, tokenizer_identity

    try:
        return tokenizer_identity(build_tokenizer("HuggingFaceTokenizer", hf_dir)), None
    except (ValueError, OSError) as err:
        return unknown, f"tokenizer.json not recorded ({err})"


def convert(args: argparse.Namespace) -> Path:
    """Check, build, stream, save; returns the written ``iter_*`` directory."""
    from megatron_ddk.convert import workspace
    from megatron_ddk.models import hf_mapping as hm

    started = time.time()
    hf_dir: Path = args.hf_dir
    if not hf_dir.is_dir():
        raise HFConversionError(f"--hf-dir {hf_dir}: no such directory")
    workspace.check_output_directory(args.save, args.overwrite, flag="--save")
    values = hm.read_hf_config(hf_dir)
    model_cfg = hm.model_config_from_hf(values, source=hf_dir / "config.json")
    hf_rows = model_cfg.vocab_size
    tokenizer, tokenizer_note = tokenizer_record(hf_dir, hf_rows)
    vocab_note = None
    tokens = tokenizer.get("vocab_size") if tokenizer.get("type") else None
    if tokens is not None and tokens > hf_rows:
        raise HFConversionError(
            f"--hf-dir {hf_dir}: tokenizer.json has {tokens} tokens but config.json vocab_size is "
            f"only {hf_rows}; the tokenizer does not belong to this model"
        )
    if args.vocab_size_from_tokenizer:
        if tokens is None:
            raise HFConversionError(
                f"--vocab-size-from-tokenizer needs a usable tokenizer.json in {hf_dir} ({tokenizer_note})"
            )
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tokens)
    elif tokens is not None and tokens < hf_rows:
        vocab_note = (
            f"config.json vocab_size {hf_rows} > the tokenizer's {tokens} tokens; the checkpoint keeps all "
            f"{hf_rows} rows (exact round trip). A student built from this tokenizer pads differently: "
            "pass --vocab-size-from-tokenizer to keep only the tokenizer's rows"
        )
    placements = hm.hf_placements(model_cfg, hf_vocab_size=hf_rows, architecture=values["architectures"][0])
    weights = hm.scan_safetensors(hf_dir)
    ignored = hm.check_hf_weights(
        weights, placements, tied=not model_cfg.untie_embeddings_and_output_weights, source=hf_dir
    )
    dtype, dtype_note = target_dtype(args, values.get("torch_dtype"))

    final = _write_checkpoint(args.save, model_cfg, weights, placements, dtype, tokenizer, args.overwrite)

    for note in (dtype_note, tokenizer_note, vocab_note):
        if note:
            print(f"note: {note}")
    if ignored:
        print(
            f"note: ignored {len(ignored)} tensor(s) the model does not use ({', '.join(ignored[:3])}"
            f"{' ...' if len(ignored) > 3 else ''})"
        )
    print(
        f"converted {values['architectures'][0]} from {hf_dir} ({len(weights.shard_files)} shard(s), "
        f"{len(placements)} tensors): {model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}, "
        f"{model_cfg.num_attention_heads} heads / {model_cfg.query_groups} kv, vocab {model_cfg.vocab_size}, "
        f"{model_cfg.num_parameters() / 1e6:.2f}M params, {str(dtype).removeprefix('torch.')} -> {final} "
        f"in {time.time() - started:.1f} s"
    )
    return final


def _write_checkpoint(
    save: Path, model_cfg, weights, placements, dtype: torch.dtype, tokenizer: dict, overwrite: bool
) -> Path:
    """Build at TP1/PP1, stream the weights in, save into a sibling staging root, then swap it in."""
    from megatron_ddk.checkpointing import iteration_dir
    from megatron_ddk.convert import workspace

    staging = save.with_name(save.name + ".converting")
    try:
        with workspace.single_process_model(model_cfg, dtype, purpose="it writes TP1/PP1") as model:
            _fill_and_save(model, model_cfg, weights, placements, tokenizer, staging)
        workspace.publish_output(staging, save, overwrite, flag="--save")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return iteration_dir(save, 0)


def _fill_and_save(model, model_cfg, weights, placements, tokenizer: dict, staging: Path) -> None:
    """Copy every HF tensor into ``model`` (NaN-filled first, so a missed slice is caught) and save it."""
    from megatron_ddk.checkpointing import CheckpointMetadata, save_checkpoint
    from megatron_ddk.models import hf_mapping as hm

    params = dict(model.named_parameters())
    with torch.no_grad():
        for param in params.values():
            param.fill_(float("nan"))  # any slice no HF tensor reaches stays NaN and is caught below
        for rows in hm.vocab_padding_rows(model_cfg, params):
            rows.zero_()
        hm.copy_hf_weights(params, weights, placements)
        unfilled = [name for name, param in params.items() if torch.isnan(param).any()]
    if unfilled:
        raise HFConversionError(
            f"no HF tensor filled megatron parameter(s) {', '.join(unfilled)}; "
            "this is a converter bug, please report it"
        )
    metadata = CheckpointMetadata(
        iteration=0,
        model=model_cfg,
        tokenizer=tokenizer,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        data_parallel_size=1,
        ddk_mode="hf-import",
        has_optimizer=False,
    )
    shutil.rmtree(staging, ignore_errors=True)
    save_checkpoint(staging, metadata, {"model": model.sharded_state_dict()})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        prepare_process()
        convert(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
