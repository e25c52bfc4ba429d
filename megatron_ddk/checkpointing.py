"""Distributed checkpoints (``megatron.core.dist_checkpointing``), published atomically.

Layout under ``--save`` (Megatron's, so its users find their way around)::

    latest_checkpointed_iteration.txt     the tracker: written last, with os.replace
    iter_0000200/                         one dist checkpoint: model (+ optimizer) shards, common.pt,
        ddk_checkpoint.json               and our metadata: model config, tokenizer identity, layout

A checkpoint is written into ``iter_0000200.tmp`` and renamed when every rank has finished; only then
is the tracker replaced. A crash mid-save leaves the previous checkpoint and tracker untouched.
Sharded tensors carry global shapes, so loading reshards to the current TP/PP automatically.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_ddk.config import ModelConfig
from megatron_ddk.errors import CheckpointError

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
METADATA_FILENAME = "ddk_checkpoint.json"
FORMAT_VERSION = 1

# The distributed optimizer's state in a layout-independent form, so checkpoints reshard to any
# TP/PP/DP. Its gather to DP rank 0 calls Tensor.cuda(), so CPU runs (tests) use the DP-resharding
# format instead; non-distributed optimizers ignore this.
OPTIMIZER_CKPT_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable" if torch.cuda.is_available() else "dp_reshardable"}


@dataclass(frozen=True, kw_only=True)
class CheckpointMetadata:
    """What a checkpoint says about itself; enough to rebuild its model without any flags."""

    iteration: int
    model: ModelConfig
    tokenizer: dict[str, Any]
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    data_parallel_size: int
    ddk_mode: str
    has_optimizer: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "iteration": self.iteration,
            "model": self.model.to_dict(),
            "tokenizer": self.tokenizer,
            "tensor_model_parallel_size": self.tensor_model_parallel_size,
            "pipeline_model_parallel_size": self.pipeline_model_parallel_size,
            "data_parallel_size": self.data_parallel_size,
            "ddk_mode": self.ddk_mode,
            "has_optimizer": self.has_optimizer,
        }

    @classmethod
    def from_json(cls, values: dict[str, Any], source: Path) -> CheckpointMetadata:
        if values.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{source}: unsupported checkpoint format_version {values.get('format_version')!r}")
        fields = dict(values)
        fields.pop("format_version")
        fields["model"] = ModelConfig.from_dict(fields["model"])
        return cls(**fields)


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def read_tracker(root: str | os.PathLike) -> int | None:
    """The latest published iteration under ``root``, or None when there is no checkpoint yet."""
    tracker = Path(root) / TRACKER_FILENAME
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number; fix or delete it")
    return int(text)


def resolve_checkpoint(path: str | os.PathLike, *, flag: str) -> Path:
    """An ``iter_*`` directory from a checkpoint root (via its tracker) or the directory itself."""
    path = Path(path)
    if (path / METADATA_FILENAME).exists():
        return path
    if not path.exists():
        raise CheckpointError(f"{flag} {path}: no such directory; point it at a checkpoint written by this project")
    iteration = read_tracker(path)
    if iteration is None:
        raise CheckpointError(
            f"{flag} {path}: no {TRACKER_FILENAME} and no {METADATA_FILENAME}; point it at a checkpoint root "
            "written by pretrain_ddk.py or tools/convert_hf_to_megatron.py"
        )
    resolved = iteration_dir(path, iteration)
    if not (resolved / METADATA_FILENAME).exists():
        raise CheckpointError(f"{flag} {path}: the tracker names iteration {iteration} but {resolved} is incomplete")
    return resolved


def read_metadata(path: str | os.PathLike, *, flag: str = "--load") -> CheckpointMetadata:
    resolved = resolve_checkpoint(path, flag=flag)
    source = resolved / METADATA_FILENAME
    try:
        values = json.loads(source.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{source} is not valid JSON ({err}); the checkpoint is damaged") from err
    return CheckpointMetadata.from_json(values, source)


# --------------------------------------------------------------------------------------------- save


def save_checkpoint(root: str | os.PathLike, metadata: CheckpointMetadata, sharded_state_dict: dict) -> Path:
    """Write ``sharded_state_dict`` as ``root/iter_<7-digit iteration>`` and publish it; every rank calls this."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = iteration_dir(root, metadata.iteration)
    staging = final.with_name(final.name + ".tmp")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)  # left over by a crash: never published, safe to drop
        staging.mkdir()
    _barrier()
    dist_checkpointing.save(sharded_state_dict, str(staging))
    _barrier()
    if rank0:
        _write_json_atomic(staging / METADATA_FILENAME, metadata.to_json())
        publish_directory(staging, final)  # re-saving an iteration (after a resume) replaces it
        _write_text_atomic(root / TRACKER_FILENAME, f"{metadata.iteration}\n")
    _barrier()
    return final


def publish_directory(staging: Path, final: Path) -> None:
    """Move a finished directory into place; an existing ``final`` is removed only after the swap."""
    if final.exists():
        retired = final.with_name(final.name + ".replaced")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, final)


def load_sharded(path: Path, sharded_state_dict: dict) -> dict:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load(sharded_state_dict, str(path))


def load_common(path: Path) -> dict:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(path))


def load_model_state(path: str | os.PathLike, model: torch.nn.Module, *, flag: str = "--load") -> CheckpointMetadata:
    """Load only the model weights of a checkpoint into ``model`` (a GPTModel stage), resharding."""
    resolved = resolve_checkpoint(path, flag=flag)
    metadata = read_metadata(resolved, flag=flag)
    state = load_sharded(resolved, {"model": model.sharded_state_dict()})
    model.load_state_dict(state["model"], strict=True)
    return metadata


# ------------------------------------------------------------------------------------ training state


@dataclass(frozen=True, kw_only=True)
class TrainingParts:
    """The live objects whose state a training checkpoint holds (the Trainer owns them)."""

    student: Any
    """The student's GPTModel stage (not the DDP wrapper: its sharded keys are the model's)."""
    optimizer: Any
    scheduler: Any
    """megatron-core's OptimizerParamScheduler."""
    schedule: Any
    """data.mixing.DomainMixingSchedule: the one owner of every window's domain weights."""
    controller: Any
    """ddk.controller.DDKController: the teacher's CE and the student's first/last CE."""


def save_training_checkpoint(root: str | os.PathLike, parts: TrainingParts, metadata: CheckpointMetadata, *,
                             global_batch_size: int, pg) -> Path:
    """Assemble the sharded state of ``parts`` at ``metadata.iteration`` and write it (every rank calls this)."""
    model_sd = parts.student.sharded_state_dict()
    state = {
        "model": model_sd,
        "optimizer": parts.optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_CKPT_METADATA),
        "rng_state": _rng_object(rng_state(), pg),
        "iteration": metadata.iteration,
        "consumed_samples": metadata.iteration * global_batch_size,
        "opt_param_scheduler": parts.scheduler.state_dict(),
        "mixing": parts.schedule.state_dict(),
        "ddk": parts.controller.state_dict(),
    }
    return save_checkpoint(root, metadata, state)


def load_training_checkpoint(path: Path, parts: TrainingParts, *, load_optimizer: bool, load_rng: bool,
                             use_distributed_optimizer: bool, pg) -> int:
    """Restore ``parts`` from the checkpoint at ``path``; returns its iteration.

    ``load_rng`` only when the layout is the one the checkpoint was written with (RNG states are
    per rank). The mixture weights have one owner, the sampler; checkpoints of earlier versions
    also stored them in the controller's state, and those must agree with the sampler's.
    """
    model_sd = parts.student.sharded_state_dict()
    request: dict[str, Any] = {"model": model_sd}
    if load_optimizer:
        if use_distributed_optimizer:
            _materialize_optimizer_state(parts.optimizer)
        request["optimizer"] = parts.optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                                  metadata=OPTIMIZER_CKPT_METADATA)
    if load_rng:
        request["rng_state"] = _rng_object(None, pg)
    state = load_sharded(path, request)
    parts.student.load_state_dict(state["model"], strict=True)
    if load_optimizer:
        with torch.no_grad():  # fp32 + distributed optimizer: main params are views of the live params
            parts.optimizer.load_state_dict(state["optimizer"])
    else:
        parts.optimizer.reload_model_params()
    common = load_common(path)
    iteration = int(common["iteration"])
    parts.scheduler.load_state_dict(common["opt_param_scheduler"])
    parts.schedule.load_state_dict(common["mixing"])
    parts.controller.load_state_dict(common["ddk"])
    legacy = common["ddk"].get("weights")
    if legacy is not None:
        latest = parts.schedule.weight_history[-1]  # the last fixed window's (later ones inherit them)
        if not np.array_equal(np.asarray(legacy, dtype=np.float64), np.asarray(latest, dtype=np.float64)):
            raise CheckpointError(f"{path}: the DDK controller's weights {legacy} disagree with the sampler's "
                                  f"latest {latest}; the checkpoint is inconsistent, resume from an earlier one")
    if load_rng:
        set_rng_state(state["rng_state"])
    return iteration


def _materialize_optimizer_state(optimizer) -> None:
    """The distributed optimizer describes its state from the live torch optimizer, which has none
    before the first step; with torch's Adam (no TE/apex: CPU) it also needs a ``step``."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        opt.init_state_fn(opt.optimizer, opt.config)
        for state in opt.optimizer.state.values():
            state.setdefault("step", torch.tensor(0.0))


def _rng_object(state, pg):
    """This rank's RNG state as a ShardedObject keyed by its (PP, TP, DP) coordinates in ``pg``."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    groups = (pg.pp, pg.tp, pg.dp)
    return ShardedObject("rng_state", state, tuple(dist.get_world_size(g) for g in groups),
                         tuple(dist.get_rank(g) for g in groups), replica_id=0)


# ---------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every generator the run draws from, as plain lists/tensors (loadable with weights_only=True)."""
    from megatron.core import tensor_parallel

    np_state = np.random.get_state()
    return {
        "random": _to_plain(random.getstate()),
        "np_random": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_to_plain, np_state[2:])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(_to_tuple(state["random"]))
    np_state = state["np_random"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _to_plain(value):
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


def _to_tuple(value):
    if isinstance(value, list):
        return tuple(_to_tuple(v) for v in value)
    return value


# ------------------------------------------------------------------------------------------ helpers


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _write_json_atomic(path: Path, values: dict) -> None:
    _write_text_atomic(path, json.dumps(values, indent=2, sort_keys=True) + "\n")
