"""A megatron-ddk checkpoint (any TP/PP/EP it was saved at) -> a Hugging Face model directory.

    python tools/convert_megatron_to_hf.py --load ckpt/student --output-dir student-hf \
        --tokenizer-dir Qwen2.5-7B [--dtype bf16|fp32] [--architecture Qwen2ForCausalLM] [--max-shard-size 5GB]

The model is rebuilt from the checkpoint's own config at TP1/PP1 (dist_checkpointing gathers the
shards), split back into HF tensors (q/k/v per query group, gate/up, vocabulary padding dropped)
and written as safetensors shards of at most --max-shard-size, plus config.json and the tokenizer
files from --tokenizer-dir. The HF family follows the model: q/k norm -> Qwen3, q/k/v bias -> Qwen2,
else LLaMA (--architecture MistralForCausalLM writes the same weights as Mistral); MoE: a shared expert
-> Qwen2-MoE, q/k norm -> Qwen3-MoE, else Mixtral. Everything is written to a staging directory and renamed into place at the end.
Peak memory is about one model plus one shard.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import _bootstrap  # noqa: F401
import torch

from megatron_ddk.errors import UserError
from megatron_ddk.models.hf_mapping import (
    MODEL_TYPES,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    SUPPORTED_ARCHITECTURES,
    HFConversionError,
)
from megatron_ddk.platform.startup import prepare_process

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--load", required=True, type=Path, help="checkpoint root or iter_* directory")
    parser.add_argument("--output-dir", required=True, type=Path, help="HF model directory to write")
    parser.add_argument(
        "--tokenizer-dir", type=Path, help="copy the tokenizer files from here (e.g. the HF teacher)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: the checkpoint's)")
    parser.add_argument(
        "--architecture",
        choices=SUPPORTED_ARCHITECTURES,
        help="HF class to write (default: derived from the model config)",
    )
    parser.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    return parser.parse_args(argv)


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match or int(match.group(1)) <= 0:
        raise HFConversionError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 500MB or 1000000")
    return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()]


def tokenizer_files(tokenizer_dir: Path | None, recorded: dict, vocab_rows: int) -> list[Path]:
    """The tokenizer files to copy; refuses a tokenizer other than the recorded one or larger than the vocab."""
    if tokenizer_dir is None:
        return []
    if not tokenizer_dir.is_dir():
        raise HFConversionError(f"--tokenizer-dir {tokenizer_dir}: no such directory")
    files = [tokenizer_dir / name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    if not files:
        raise HFConversionError(f"--tokenizer-dir {tokenizer_dir} holds none of {', '.join(TOKENIZER_FILES)}")
    main_file = {"HuggingFaceTokenizer": "tokenizer.json", "SentencePieceTokenizer": "tokenizer.model"}.get(
        recorded.get("type") or ""
    )
    if main_file and recorded.get("sha256") and (tokenizer_dir / main_file).is_file():
        digest = hashlib.sha256((tokenizer_dir / main_file).read_bytes()).hexdigest()
        if digest != recorded["sha256"]:
            raise HFConversionError(
                f"--tokenizer-dir {tokenizer_dir}: {main_file} (sha256 {digest[:12]}) is not the "
                f"tokenizer this checkpoint was trained with (sha256 {recorded['sha256'][:12]}); "
                "pass the directory of the training tokenizer"
            )
    size = _tokenizer_size(tokenizer_dir)
    if size is not None and size > vocab_rows:
        raise HFConversionError(
            f"--tokenizer-dir {tokenizer_dir}: the tokenizer has {size} tokens but the model only "
            f"{vocab_rows} embedding rows; pass the tokenizer the model was trained with"
        )
    return files


def special_token_ids(tokenizer_dir: Path | None, recorded: dict) -> dict[str, int | None]:
    """bos/eos/pad ids for config.json: from the tokenizer files when given, else the recorded end-of-document."""
    ids: dict[str, int | None] = {
        "bos_token_id": None,
        "eos_token_id": recorded.get("eod"),
        "pad_token_id": None,
    }
    if tokenizer_dir is None:
        return ids
    if (tokenizer_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        special = {
            **_read_json(tokenizer_dir / "special_tokens_map.json"),
            **_read_json(tokenizer_dir / "tokenizer_config.json"),
        }
        for role in ("bos", "eos", "pad"):
            text = special.get(f"{role}_token")
            text = text.get("content") if isinstance(text, dict) else text
            if isinstance(text, str) and tok.token_to_id(text) is not None:
                ids[f"{role}_token_id"] = tok.token_to_id(text)
    elif (tokenizer_dir / "tokenizer.model").is_file():
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
        for role, value in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id())):
            if value >= 0:
                ids[f"{role}_token_id"] = value
    return ids


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Consecutive tensors grouped into files of at most ``max_bytes`` (a bigger tensor gets its own file)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def convert(args: argparse.Namespace) -> Path:
    from megatron_ddk.checkpointing import read_metadata, resolve_checkpoint
    from megatron_ddk.convert import workspace
    from megatron_ddk.models import hf_mapping as hm

    started = time.time()
    max_bytes = parse_size(args.max_shard_size)
    workspace.check_output_directory(args.output_dir, args.overwrite, flag="--output-dir")
    resolved = resolve_checkpoint(args.load, flag="--load")
    metadata = read_metadata(resolved, flag="--load")
    model_cfg = metadata.model
    architecture = args.architecture or hm.default_architecture(model_cfg)
    copies = tokenizer_files(args.tokenizer_dir, metadata.tokenizer or {}, model_cfg.vocab_size)
    dtype = DTYPES[args.dtype] if args.dtype else _stored_dtype(resolved)
    values = hm.hf_config_values(
        model_cfg,
        architecture=architecture,
        dtype=dtype,
        token_ids=special_token_ids(args.tokenizer_dir, metadata.tokenizer or {}),
    )
    from transformers import AutoConfig

    hf_config = AutoConfig.for_model(MODEL_TYPES[architecture], **values)

    staging = args.output_dir.with_name(args.output_dir.name + ".exporting")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        shards = _write_weights(resolved, model_cfg, architecture, dtype, max_bytes, staging)
        hf_config.save_pretrained(str(staging))
        for source in copies:
            shutil.copy2(source, staging / source.name)
        workspace.publish_output(staging, args.output_dir, args.overwrite, flag="--output-dir")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(
        f"exported {resolved} (iteration {metadata.iteration}) as {architecture}: {model_cfg.num_layers} layers, "
        f"vocab {model_cfg.vocab_size}, {str(dtype).removeprefix('torch.')}, {shards} shard(s), "
        f"{len(copies)} tokenizer file(s) -> {args.output_dir} in {time.time() - started:.1f} s"
    )
    return args.output_dir


def _write_weights(
    resolved: Path, model_cfg, architecture: str, dtype: torch.dtype, max_bytes: int, staging: Path
) -> int:
    """Load at TP1/PP1 and write the HF tensors shard by shard; returns the number of files."""
    from safetensors.torch import save_file

    from megatron_ddk.checkpointing import load_model_state
    from megatron_ddk.convert import workspace
    from megatron_ddk.models import hf_mapping as hm

    with workspace.single_process_model(model_cfg, dtype, purpose="it gathers to TP1/PP1") as model:
        load_model_state(resolved, model, flag="--load")
        params = dict(model.named_parameters())
        placements = hm.hf_placements(model_cfg, architecture=architecture)
        sizes = {name: math.prod(p.hf_shape) * dtype.itemsize for name, p in placements.items()}
        shards = plan_shards(sizes, max_bytes)
        names = (
            [SAFETENSORS_FILE]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        weight_map = {}
        for file_name, shard in zip(names, shards):
            tensors = {name: hm.export_tensor(params, placements[name], dtype) for name in shard}
            save_file(tensors, str(staging / file_name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file_name))
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            (staging / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return len(shards)


def _stored_dtype(resolved: Path) -> torch.dtype:
    """The dtype the embedding was saved in (bf16 or fp32 runs); read from the checkpoint metadata only."""
    from megatron_ddk.checkpointing import load_tensors_metadata

    tensors = load_tensors_metadata(resolved)
    stored = tensors["embedding.word_embeddings.weight"].dtype
    return torch.bfloat16 if stored == torch.bfloat16 else torch.float32


def _tokenizer_size(tokenizer_dir: Path) -> int | None:
    if (tokenizer_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size(
            with_added_tokens=True
        )
    return None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


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
