"""Distributed checkpoints (``megatron.core.dist_checkpointing``), published atomically.

Layout under ``--save`` (Megatron's, so its users find their way around)::

    latest_checkpointed_iteration.txt     the tracker: written last, with os.replace
    iter_0000200/                         one dist checkpoint: model (+ optimizer) shards, common.pt,
        ddk_checkpoint.json               our metadata: model config, tokenizer identity, layout
        ddk_manifest.json                 size and checksum of every other file (checkpoint_manifest)

A checkpoint is written into ``iter_0000200.tmp``, its manifest written, and renamed when every rank
has finished; only then is the tracker replaced. A crash mid-save leaves the previous checkpoint and
tracker untouched. With ``--async-save`` the write runs in a background process and the same steps
(``publish_checkpoint``) run once it has finished on every rank (``BackgroundSaves``). Loading checks
the manifest before any weight is read and parses every file without running code from it
(checkpoint_safety). Sharded tensors carry global shapes, so loading reshards to the current TP/PP
automatically.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_ddk import checkpoint_manifest
from megatron_ddk.config import ModelConfig
from megatron_ddk.errors import CheckpointError

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
METADATA_FILENAME = "ddk_checkpoint.json"
FORMAT_VERSION = 1
RNG_PREFIX = "rng_state."
"""RNG state is saved as tensors under this key prefix; older checkpoints hold one stored (pickled)
object ``rng_state`` instead, loaded with ``weights_only=True`` (``set_legacy_rng_state``)."""
_ITER_DIR = re.compile(r"iter_(\d{7})$")

# The distributed optimizer's state in a layout-independent form, so checkpoints reshard to any
# TP/PP/DP. Its gather to DP rank 0 calls Tensor.cuda(), so CPU runs (tests) use the DP-resharding
# format instead; non-distributed optimizers ignore this.
OPTIMIZER_CKPT_METADATA = {
    "distrib_optim_sharding_type": "fully_reshardable" if torch.cuda.is_available() else "dp_reshardable"
}


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
            raise CheckpointError(
                f"{source}: unsupported checkpoint format_version {values.get('format_version')!r}"
            )
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


def resolve_checkpoint(path: str | os.PathLike, *, flag: str, step: int | None = None) -> Path:
    """An ``iter_*`` directory from a checkpoint root (via its tracker, or ``step``: ``--ckpt-step``) or
    the directory itself."""
    path = Path(path)
    if step is not None and not (path / METADATA_FILENAME).exists():
        resolved = iteration_dir(path, step)
        if not (resolved / METADATA_FILENAME).exists():
            raise CheckpointError(
                f"{flag} {path} --ckpt-step {step}: {resolved} is not a complete checkpoint; "
                f"choose one of {available_iterations(path) or 'none'}"
            )
        return resolved
    if (path / METADATA_FILENAME).exists():
        return path
    if not path.exists():
        raise CheckpointError(
            f"{flag} {path}: no such directory; point it at a checkpoint written by this project"
        )
    iteration = read_tracker(path)
    if iteration is None:
        raise CheckpointError(
            f"{flag} {path}: no {TRACKER_FILENAME} and no {METADATA_FILENAME}; point it at a checkpoint root "
            "written by pretrain_ddk.py or tools/convert_hf_to_megatron.py"
        )
    resolved = iteration_dir(path, iteration)
    if not (resolved / METADATA_FILENAME).exists():
        raise CheckpointError(
            f"{flag} {path}: the tracker names iteration {iteration} but {resolved} is incomplete"
        )
    return resolved


def available_iterations(root: str | os.PathLike) -> list[int]:
    """Iterations of the published (``iter_NNNNNNN`` with metadata) checkpoints under ``root``, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = (_ITER_DIR.match(p.name) for p in root.iterdir())
    return sorted(int(m.group(1)) for m in found if m and (root / m.group(0) / METADATA_FILENAME).exists())


def read_metadata(path: str | os.PathLike, *, flag: str = "--load") -> CheckpointMetadata:
    """What the checkpoint says about itself. Cheap checks come first, before any process group: its
    files' presence and sizes (manifest) and its tensor index (read with the restricted unpickler)."""
    from megatron_ddk.checkpoint_safety import read_dcp_metadata

    resolved = resolve_checkpoint(path, flag=flag)
    _raise_on_damage(resolved, flag, checkpoint_manifest.find_problem(resolved, full=False))
    read_dcp_metadata(resolved)
    source = resolved / METADATA_FILENAME
    try:
        values = json.loads(source.read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{source} is not valid JSON ({err}); the checkpoint is damaged") from err
    try:
        return CheckpointMetadata.from_json(values, source)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(
            f"{source} does not describe a checkpoint ({type(err).__name__}: {err}); "
            "the checkpoint is damaged"
        ) from err


# --------------------------------------------------------------------------------------------- save


def save_checkpoint(
    root: str | os.PathLike,
    metadata: CheckpointMetadata,
    sharded_state_dict: dict,
    *,
    timings: dict[str, float] | None = None,
    background: BackgroundSaves | None = None,
) -> Path:
    """Write ``sharded_state_dict`` as ``root/iter_<7-digit iteration>`` and publish it; every rank calls this.

    With ``background`` (``--async-save``) this returns once the state is staged and its writer
    process started; ``background`` publishes it later (``publish_checkpoint``, the same steps as here).
    ``timings`` (if given) receives the seconds spent on the manifest (``"manifest"``) of a synchronous save.
    """
    from megatron.core import dist_checkpointing

    from megatron_ddk.platform.helper_processes import tie_helpers_to_this_process, use_write_results_queue

    if background is not None:
        background.finish(blocking=True)  # one save at a time: the previous one is published first
    tie_helpers_to_this_process()  # the writer's forked workers die with this rank, even on SIGKILL
    use_write_results_queue(background=background is not None)
    root = Path(root)
    final = iteration_dir(root, metadata.iteration)
    staging = final.with_name(final.name + ".tmp")
    if not dist.is_initialized() or dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob("iter_*.tmp"):  # left by a killed save: never published, safe to drop
            if _ITER_DIR.match(leftover.name[: -len(".tmp")]):
                shutil.rmtree(leftover)
        staging.mkdir()
    _barrier()
    if background is None:
        dist_checkpointing.save(sharded_state_dict, str(staging))
        publish_checkpoint(staging, final, metadata, timings=timings)
    else:
        request = dist_checkpointing.save(sharded_state_dict, str(staging), async_sharded_save=True)
        background.schedule(request, final, partial(publish_checkpoint, staging, final, metadata))
    return final


def publish_checkpoint(
    staging: Path, final: Path, metadata: CheckpointMetadata, *, timings: dict[str, float] | None = None
) -> None:
    """Everything after the write, in this order, on every rank: checksums of each rank's own shards,
    then (rank 0) the metadata, the manifest, the rename to ``final`` and, last, the tracker."""
    _barrier()
    start = time.perf_counter()
    rank = dist.get_rank() if dist.is_initialized() else 0
    entries = checkpoint_manifest.describe(staging, checkpoint_manifest.own_shard_files(staging, rank))
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, entries)
        entries = {name: entry for part in gathered for name, entry in part.items()}
    spent = time.perf_counter() - start
    if rank == 0:
        _write_json_atomic(staging / METADATA_FILENAME, metadata.to_json())
        start = time.perf_counter()
        checkpoint_manifest.write_manifest(staging, entries)
        if timings is not None:
            timings["manifest"] = spent + time.perf_counter() - start
        publish_directory(staging, final)  # re-saving an iteration (after a resume) replaces it
        _write_text_atomic(final.parent / TRACKER_FILENAME, f"{metadata.iteration}\n")
    _barrier()


class BackgroundSaves:
    """``--async-save``: the saves being written by background processes, published when written.

    Built on megatron-core's ``AsyncCallsQueue`` with its forking caller: each save forks one writer
    process, which sees the state as it was at the fork (on a GPU, staged into host memory first), so
    training goes on changing the weights. ``finish`` runs the publication of the saves whose writers
    are done on every rank (megatron-core's finalization: the ``.metadata`` index, then
    ``publish_checkpoint``); it is collective, so every rank calls it at the same point of the loop.
    ``log`` receives the lines saying when a save was scheduled and when it was published.
    """

    def __init__(self, log: Callable[[str], None]):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._calls = AsyncCallsQueue(persistent=False)  # the persistent worker needs CUDA to start
        self._log = log
        # the save being written: one at a time (save_checkpoint publishes the previous one first)
        self._writing: Path | None = None

    @property
    def pending(self) -> int:
        return self._calls.get_num_unfinalized_calls()

    def schedule(self, request, final: Path, publish: Callable[..., None]) -> None:
        """Start the writer of ``request`` (from ``dist_checkpointing.save(..., async_sharded_save=True)``);
        ``publish(timings=...)`` runs after megatron-core's own finalization."""
        scheduled = time.perf_counter()

        def publish_and_log() -> None:
            timings: dict[str, float] = {}
            publish(timings=timings)
            self._writing = None
            self._log(
                f"  published async checkpoint at iteration {_iteration_of(final):7d} to {final} "
                f"[ {time.perf_counter() - scheduled:.2f}s after it was scheduled, "
                f"manifest {timings.get('manifest', 0.0):.3f}s ]"
            )

        request.add_finalize_fn(publish_and_log)
        self._calls.schedule_async_request(request)
        self._writing = final

    def finish(self, *, blocking: bool) -> None:
        """Publish every save whose writer finished on all ranks (``blocking``: wait for all of them)."""
        from megatron.core.dist_checkpointing.core import CheckpointingException
        from torch.distributed.checkpoint.api import CheckpointException

        if not self.pending:
            return
        try:
            self._calls.maybe_finalize_async_calls(blocking=blocking)
        except CheckpointException as err:
            # only the coordinating rank holds the writers' exceptions: it logs them, and every rank
            # raises the same line (whichever rank prints first before torchrun stops the others)
            for rank, (cause, _trace) in sorted(err.failures.items()):
                self._log(f"  background checkpoint writer of rank {rank} failed: {_first_line(cause)}")
            raise CheckpointError(
                f"the background save to {self._writing} failed (a writer process did not finish; rank 0's "
                f"log names the cause); it was not published: {TRACKER_FILENAME} still names the previous "
                "checkpoint"
            ) from None
        except (CheckpointingException, OSError, RuntimeError) as err:
            raise CheckpointError(
                f"the background save to {self._writing} failed ({_first_line(err)}); it was not "
                f"published: {TRACKER_FILENAME} still names the previous checkpoint"
            ) from None

    def close(self) -> None:
        """Publish what is still being written, then stop (every rank, e.g. before exit)."""
        self.finish(blocking=True)
        self._calls.close()


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: " + (str(err).strip().splitlines() or [""])[0][:300]


def _iteration_of(path: Path) -> int:
    return int(path.name.split("_")[1])


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


# --------------------------------------------------------------------------------------------- load


def verify_checkpoint(path: Path, *, flag: str = "--load") -> None:
    """Checksum every file of ``path`` against its manifest (ranks share the reading); raise on damage.

    A checkpoint without a manifest (older than this check) gets a warning and is not verified."""
    if checkpoint_manifest.read_manifest(path) is None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(
                f"warning: {flag} {path} has no {checkpoint_manifest.MANIFEST_FILENAME} (saved before checksums "
                "existed); its files cannot be verified",
                file=sys.stderr,
                flush=True,
            )
        return
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problem = checkpoint_manifest.find_problem(path, full=True, part=rank, parts=world)
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, problem)
        problem = next((p for p in gathered if p), None)
    _raise_on_damage(path, flag, problem)


def _raise_on_damage(path: Path, flag: str, problem: str | None) -> None:
    if problem is None:
        return
    raise CheckpointError(f"{problem}; {_intact_fallback(path, flag)}")


def _intact_fallback(path: Path, flag: str) -> str:
    """Where to go instead of a damaged checkpoint: the newest older one whose files all check out."""
    root = path.parent
    mine = _ITER_DIR.match(path.name)
    older = [i for i in available_iterations(root) if mine and i < int(mine.group(1))]
    for iteration in reversed(older):
        candidate = iteration_dir(root, iteration)
        if (
            checkpoint_manifest.read_manifest(candidate) is not None
            and checkpoint_manifest.find_problem(candidate) is None
        ):
            use = f"--load {root} --ckpt-step {iteration}" if flag == "--load" else f"{flag} {candidate}"
            return f"the newest intact checkpoint is iteration {iteration}: use {use}"
    return "no older intact checkpoint exists here; restore the file or start from another checkpoint"


def _load_strategies():
    from megatron_ddk.checkpoint_safety import SafeCommonLoadStrategy, SafeTorchDistLoadStrategy

    return SafeTorchDistLoadStrategy(), SafeCommonLoadStrategy()


def load_sharded(path: Path, sharded_state_dict: dict, *, flag: str = "--load") -> dict:
    """Verify ``path`` against its manifest, then load ``sharded_state_dict`` from it without running code."""
    from megatron.core import dist_checkpointing

    verify_checkpoint(path, flag=flag)
    sharded, common = _load_strategies()
    with _damage_as_checkpoint_error(path):
        return dist_checkpointing.load(
            sharded_state_dict, str(path), sharded_strategy=sharded, common_strategy=common
        )


def load_common(path: Path) -> dict:
    """The non-sharded state (``common.pt``), read with ``weights_only=True``."""
    return _load_strategies()[1].load_common(Path(path))


def load_tensors_metadata(path: Path) -> dict:
    """Names, shapes and dtypes of the saved tensors, from the ``.metadata`` index (restricted unpickler)."""
    from megatron.core import dist_checkpointing

    with _damage_as_checkpoint_error(path):
        return dist_checkpointing.load_tensors_metadata(str(path), sharded_strategy=_load_strategies()[0])


def saved_keys(path: Path) -> set[str]:
    """Every key in the checkpoint's ``.metadata`` index (tensors and stored objects)."""
    from megatron_ddk.checkpoint_safety import read_dcp_metadata

    return set(read_dcp_metadata(path).state_dict_metadata)


@contextlib.contextmanager
def _damage_as_checkpoint_error(path: Path):
    """megatron-core and torch report an unreadable shard as a long multi-rank traceback (torch's
    CheckpointException is a BaseException); turn it into one CheckpointError line."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointError:
        raise
    except CheckpointException as err:
        causes = [failure[0] if isinstance(failure, tuple) else failure for failure in err.failures.values()]
        own = next((c for c in causes if isinstance(c, CheckpointError)), None)
        if own is not None:
            raise own from None
        _raise_unreadable(path, causes[0] if causes else err)
    except (CheckpointingException, EOFError, OSError, RuntimeError, ValueError, KeyError) as err:
        _raise_unreadable(path, err)


def _raise_unreadable(path: Path, cause: BaseException):
    first = (str(cause).strip().splitlines() or [""])[0][:300]
    raise CheckpointError(
        f"{path} cannot be read ({type(cause).__name__}: {first}); it is damaged: check it "
        f"with tools/verify_checkpoint.py {path}"
    ) from None


def load_model_state(
    path: str | os.PathLike, model: torch.nn.Module, *, flag: str = "--load"
) -> CheckpointMetadata:
    """Load only the model weights of a checkpoint into ``model`` (a GPTModel stage), resharding."""
    resolved = resolve_checkpoint(path, flag=flag)
    metadata = read_metadata(resolved, flag=flag)
    state = load_sharded(resolved, {"model": model.sharded_state_dict()}, flag=flag)
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


def save_training_checkpoint(
    root: str | os.PathLike,
    parts: TrainingParts,
    metadata: CheckpointMetadata,
    *,
    global_batch_size: int,
    pg,
    timings: dict[str, float] | None = None,
    background: BackgroundSaves | None = None,
) -> Path:
    """Assemble the sharded state of ``parts`` at ``metadata.iteration`` and write it (every rank calls
    this); with ``background``, in a background process (``save_checkpoint``)."""
    model_sd = parts.student.sharded_state_dict()
    state = {
        "model": model_sd,
        "optimizer": parts.optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_CKPT_METADATA),
        "rng_state": rng_sharded_state(rng_tensors(), _rng_grid(pg), replica_id=_cp_rank(pg)),
        "iteration": metadata.iteration,
        "consumed_samples": metadata.iteration * global_batch_size,
        "opt_param_scheduler": parts.scheduler.state_dict(),
        "mixing": parts.schedule.state_dict(),
        "ddk": parts.controller.state_dict(),
    }
    return save_checkpoint(root, metadata, state, timings=timings, background=background)


def load_training_checkpoint(
    path: Path,
    parts: TrainingParts,
    *,
    load_optimizer: bool,
    load_rng: bool,
    use_distributed_optimizer: bool,
    pg,
) -> int:
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
        request["optimizer"] = parts.optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=OPTIMIZER_CKPT_METADATA
        )
    legacy_rng = load_rng and not any(key.startswith(RNG_PREFIX) for key in saved_keys(path))
    if load_rng:
        request["rng_state"] = (
            _legacy_rng_object(pg)
            if legacy_rng
            else rng_sharded_state(rng_tensors(), _rng_grid(pg), replica_id=_cp_rank(pg))
        )
    state = load_sharded(path, request)
    parts.student.load_state_dict(state["model"], strict=True)
    if load_optimizer:
        with torch.no_grad():  # fp32 + distributed optimizer: main params are views of the live params
            parts.optimizer.load_state_dict(state["optimizer"])
        if use_distributed_optimizer:
            _restore_adam_steps(parts.optimizer)
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
            raise CheckpointError(
                f"{path}: the DDK controller's weights {legacy} disagree with the sampler's "
                f"latest {latest}; the checkpoint is inconsistent, resume from an earlier one"
            )
    if load_rng:
        (set_legacy_rng_state if legacy_rng else set_rng_tensors)(state["rng_state"])
    return iteration


def _materialize_optimizer_state(optimizer) -> None:
    """The distributed optimizer describes its state from the live torch optimizer, which has none
    before the first step; with torch's Adam (no TE/apex: CPU) it also needs a ``step``."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        opt.init_state_fn(opt.optimizer, opt.config)
        for state in opt.optimizer.state.values():
            state.setdefault("step", torch.tensor(0.0))


def _restore_adam_steps(optimizer) -> None:
    """Give torch's Adam (no TE/apex: CPU) its per-parameter step counts back after a distributed-
    optimizer load. megatron-core restores the count from the saved param groups into ONE tensor shared
    by every parameter, then overwrites it with the per-parameter ``step`` of the parameter state, which
    its DP-resharding format does not save (it comes back as the 0 we materialized before loading); and
    torch's Adam would increment a shared tensor once per parameter. Both make the bias correction after
    a resume wrong from the first update on. (TE's and apex's Adam keep the count in the param group.)"""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in opt.optimizer.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = opt.optimizer.state.get(param)
                if state is not None and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def _rng_grid(pg) -> tuple[tuple[int, int], ...]:
    """This rank's (rank, size) in pipeline, tensor and data parallelism of ``pg``: where its RNG state goes."""
    return tuple((dist.get_rank(g), dist.get_world_size(g)) for g in (pg.pp, pg.tp, pg.dp))


def _cp_rank(pg) -> int:
    """CP ranks of one (pp, tp, dp) slot hold the same RNG states: rank 0 saves them, the others are replicas."""
    cp = getattr(pg, "cp", None)
    return dist.get_rank(cp) if cp is not None else 0


def _legacy_rng_object(pg):
    """The stored (pickled) RNG object of checkpoints saved before RNG state became tensors."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    grid = _rng_grid(pg)
    return ShardedObject(
        "rng_state", None, tuple(n for _, n in grid), tuple(r for r, _ in grid), replica_id=0
    )


# ---------------------------------------------------------------------------------------------- RNG


def rng_tensors() -> dict[str, torch.Tensor]:
    """Every generator the run draws from, as flat tensors of the same shapes on every rank (saved as
    sharded tensors: nothing is pickled)."""
    from megatron.core import tensor_parallel

    version, internal, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    tensors = {
        "python": torch.tensor([version, *internal], dtype=torch.int64),
        "python_gauss": torch.tensor([gauss_next is not None, gauss_next or 0.0], dtype=torch.float64),
        "numpy": torch.tensor([pos, has_gauss, *keys.tolist()], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached_gaussian], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        tensors[f"tracker.{name}"] = state
    return tensors


def set_rng_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """Restore what ``rng_tensors`` returned."""
    from megatron.core import tensor_parallel

    python = tensors["python"].tolist()
    has_gauss_next, gauss_next = tensors["python_gauss"].tolist()
    random.setstate((python[0], tuple(python[1:]), gauss_next if has_gauss_next else None))
    pos, has_gauss, *keys = tensors["numpy"].tolist()
    np.random.set_state(
        ("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, float(tensors["numpy_gauss"][0]))
    )
    torch.set_rng_state(tensors["torch"].cpu())
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"].cpu())
    tracker = {
        name[len("tracker.") :]: state for name, state in tensors.items() if name.startswith("tracker.")
    }
    tensor_parallel.get_cuda_rng_tracker().set_states(tracker)


def rng_sharded_state(
    tensors: dict[str, torch.Tensor], grid: tuple[tuple[int, int], ...], *, replica_id: int = 0
) -> dict:
    """``tensors`` as ShardedTensors, one slot per rank of the (pp, tp, dp) ``grid`` of (rank, size);
    ``replica_id`` > 0: a copy of a slot another rank saves (the CP ranks > 0)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    offsets = [(axis, rank, size) for axis, (rank, size) in enumerate(grid)]
    return {
        name: ShardedTensor.from_rank_offsets(
            RNG_PREFIX + name, tensor, *offsets, replica_id=replica_id, prepend_axis_num=len(grid)
        )
        for name, tensor in tensors.items()
    }


def set_legacy_rng_state(state: dict[str, Any]) -> None:
    """RNG state of a checkpoint saved before RNG became tensors (a stored object of lists and tensors)."""
    from megatron.core import tensor_parallel

    random.setstate(_to_tuple(state["random"]))
    np_state = state["np_random"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


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
