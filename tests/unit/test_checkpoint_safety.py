"""Loading a checkpoint never runs code from it, and damaged files are refused before any weight is read.

A tiny GPTModel is saved in a one-process world; copies get a hostile pickle planted in each file
(``tests/checkpoint_faults.py``) or bytes flipped / cut / removed, and every in-process load path
(``read_metadata``, the model load behind ``--load`` / ``--teacher-load``, ``common.pt``, the tensor
index, the HF exporter, ``tools/verify_checkpoint.py``) must refuse it in one line, with the marker
file of the payload never created.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
import torch

from megatron_ddk.checkpoint_manifest import MANIFEST_FILENAME
from megatron_ddk.checkpointing import (
    CheckpointMetadata,
    iteration_dir,
    load_common,
    load_model_state,
    load_tensors_metadata,
    read_metadata,
    resolve_checkpoint,
    save_checkpoint,
)
from megatron_ddk.config import ModelConfig, ParallelConfig, PrecisionConfig
from megatron_ddk.errors import CheckpointError
from megatron_ddk.platform.distributed import ParallelLayout, destroy, initialize, set_seed
from tests import checkpoint_faults as faults
from tests.helpers import MINIMAL_RUN_FLAGS, REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tools"))
import convert_megatron_to_hf as to_hf  # noqa: E402
import verify_checkpoint  # noqa: E402

MODEL = ModelConfig(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=64,
    vocab_size=200,
    max_position_embeddings=16,
    swiglu=True,
    add_bias_linear=False,
)


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    pg = initialize(ParallelLayout(world_size=1))
    set_seed(1234, pg)
    yield
    destroy()


def build_model():
    from megatron_ddk.data.tokenizer import padded_vocab_size
    from megatron_ddk.models.gpt import build_gpt_model

    return build_gpt_model(
        MODEL,
        ParallelConfig(),
        PrecisionConfig(),
        pre_process=True,
        post_process=True,
        padded_vocab_size=padded_vocab_size(MODEL.vocab_size, 1, MODEL.make_vocab_size_divisible_by),
        pg=initialize(ParallelLayout(world_size=1)),
    )


def save(model, root: Path, iteration: int) -> Path:
    meta = CheckpointMetadata(
        iteration=iteration,
        model=MODEL,
        tokenizer={"type": None, "vocab_size": 200, "sha256": None},
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        data_parallel_size=1,
        ddk_mode="cpt",
        has_optimizer=False,
    )
    state = {"model": model.sharded_state_dict(), "iteration": iteration, "note": {"plain": [1, 2.0, "x"]}}
    return save_checkpoint(root, meta, state)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints at iterations 1 and 2 of the same root (weights differ), and the model of iteration 2."""
    root = tmp_path_factory.mktemp("saved") / "ckpt"
    model = build_model()
    save(model, root, 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.5)
    save(model, root, 2)
    return root, model


def fresh_copy(saved, tmp_path) -> Path:
    root, _ = saved
    faults.copy_checkpoint(iteration_dir(root, 1), tmp_path / "ckpt")
    return faults.copy_checkpoint(iteration_dir(root, 2), tmp_path / "ckpt")


def every_load_path(directory: Path, tmp_path: Path, capsys) -> dict[str, str]:
    """Each load path's one-line refusal, or "loaded"."""
    outcomes = {}
    attempts = {
        "read_metadata": lambda: read_metadata(directory),
        "model": lambda: load_model_state(directory, build_model()),  # behind --load and --teacher-load
        "common": lambda: load_common(directory),
        "index": lambda: load_tensors_metadata(directory),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
            outcomes[name] = "loaded"
        except CheckpointError as err:
            outcomes[name] = str(err)
    capsys.readouterr()
    code = to_hf.main(["--load", str(directory), "--output-dir", str(tmp_path / "hf")])
    outcomes["exporter"] = capsys.readouterr().err.strip() if code else "loaded"
    return outcomes


# which load paths read which file (the others never open it)
READERS = {
    ".metadata": ("read_metadata", "model", "index", "exporter"),
    "common.pt": ("model", "common", "exporter"),
    "shard": ("model", "exporter"),
    "metadata.json": ("model", "index", "exporter"),
    "ddk_checkpoint.json": ("read_metadata", "model", "exporter"),
}


def test_clean_checkpoint_roundtrips_and_has_a_manifest(saved, tmp_path):
    root, model = saved
    path = resolve_checkpoint(root, flag="--load")
    files = {p.name for p in path.iterdir()}
    assert MANIFEST_FILENAME in files and ".metadata" in files
    fresh = build_model()
    load_model_state(root, fresh)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    assert load_common(path)["note"] == {"plain": [1, 2.0, "x"]}
    assert verify_checkpoint.main([str(root)]) == 0


@pytest.mark.parametrize(
    "where",
    [".metadata", ".metadata (stealth)", "common.pt", "shard", "metadata.json", "ddk_checkpoint.json"],
)
def test_planted_payload_never_runs_on_any_load_path(saved, tmp_path, where, capsys):
    """The attacker also rewrites the manifest, so the parsers are what stands in the way."""
    directory = fresh_copy(saved, tmp_path)
    marker = tmp_path / "PWNED"
    if where.startswith(".metadata"):
        faults.plant_in_metadata(directory, marker, stealth="stealth" in where)
    elif where == "common.pt":
        faults.plant_in_common(directory, marker)
    elif where == "shard":
        faults.plant_in_shard(directory, marker)
    else:
        faults.plant_in_json(directory, where, marker)
    faults.rewrite_manifest(directory)
    outcomes = every_load_path(directory, tmp_path, capsys)
    assert not marker.exists()
    readers = READERS[where.split(" ")[0]]
    refusals = [outcomes[name] for name in readers]
    assert all(r != "loaded" and "\n" not in r for r in refusals), outcomes
    if where.startswith(".metadata"):
        assert all(".metadata refers to" in r and "refusing" in r for r in refusals), outcomes
    if where in ("common.pt", "shard"):
        assert all("exec" in r and "refusing" in r for r in refusals), outcomes


def test_planted_payloads_would_run_without_the_safe_paths(saved, tmp_path):
    """Sanity check of the payloads themselves: plain pickle / weights_only=False do run them."""
    directory = fresh_copy(saved, tmp_path)
    marker = tmp_path / "RAN"
    faults.plant_in_metadata(directory, marker, stealth=True)
    pickle.loads((directory / ".metadata").read_bytes())
    assert marker.exists()


def test_flipped_bytes_in_a_shard_are_refused_with_the_older_intact_checkpoint(saved, tmp_path):
    directory = fresh_copy(saved, tmp_path)
    shard = sorted(directory.glob("*.distcp"))[0]
    faults.flip_bytes(shard)
    read_metadata(directory)  # sizes still match: the cheap check passes
    with pytest.raises(CheckpointError) as err:
        load_model_state(directory.parent, build_model())
    message = str(err.value)
    assert str(shard) in message and "checksum" in message
    assert f"--load {directory.parent} --ckpt-step 1" in message
    with pytest.raises(CheckpointError, match="--teacher-load .*iter_0000001"):
        load_model_state(directory.parent, build_model(), flag="--teacher-load")
    assert verify_checkpoint.main([str(directory.parent)]) == 1
    assert verify_checkpoint.main([str(directory.parent), "--iteration", "1"]) == 0


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_truncated_or_missing_shard_is_named_before_any_process_group(saved, tmp_path, damage):
    directory = fresh_copy(saved, tmp_path)
    shard = sorted(directory.glob("*.distcp"))[-1]
    faults.truncate(shard) if damage == "truncated" else shard.unlink()
    with pytest.raises(CheckpointError) as err:
        read_metadata(directory.parent)  # what the trainer's early checks call
    message = str(err.value)
    assert str(shard) in message and (
        "truncated" in message if damage == "truncated" else "missing" in message
    )
    assert "--ckpt-step 1" in message and "\n" not in message


def test_no_older_intact_checkpoint_says_so(saved, tmp_path):
    directory = fresh_copy(saved, tmp_path)
    faults.flip_bytes(sorted(iteration_dir(directory.parent, 1).glob("*.distcp"))[0])
    faults.flip_bytes(sorted(directory.glob("*.distcp"))[0])
    with pytest.raises(CheckpointError, match="no older intact checkpoint"):
        load_model_state(directory.parent, build_model())


def test_checkpoint_without_manifest_loads_with_a_warning(saved, tmp_path, capsys):
    directory = fresh_copy(saved, tmp_path)
    (directory / MANIFEST_FILENAME).unlink()
    load_model_state(directory, build_model())
    assert "has no ddk_manifest.json" in capsys.readouterr().err
    assert verify_checkpoint.main([str(directory)]) == 0


def test_damaged_shard_without_manifest_is_one_line(saved, tmp_path):
    """An old checkpoint (no manifest) with a cut shard: megatron's 50-line exception becomes one line."""
    directory = fresh_copy(saved, tmp_path)
    (directory / MANIFEST_FILENAME).unlink()
    faults.truncate(sorted(directory.glob("*.distcp"))[0])
    with pytest.raises(CheckpointError) as err:
        load_model_state(directory, build_model())
    assert str(directory) in str(err.value) and "damaged" in str(err.value) and "\n" not in str(err.value)


def test_ckpt_step_selects_an_iteration(saved):
    root, _ = saved
    assert resolve_checkpoint(root, flag="--load", step=1) == iteration_dir(root, 1)
    with pytest.raises(CheckpointError, match=r"choose one of \[1, 2\]"):
        resolve_checkpoint(root, flag="--load", step=7)


def test_ckpt_step_flag_needs_load():
    from megatron_ddk.arguments import ArgumentError, parse_run_config

    flags = [*MINIMAL_RUN_FLAGS, "--ddk-mode", "cpt"]
    assert (
        parse_run_config([*flags, "--load", "c", "--ckpt-step", "3"], vocab_size=100).checkpoint.ckpt_step
        == 3
    )
    with pytest.raises(ArgumentError, match="--ckpt-step needs --load"):
        parse_run_config([*flags, "--ckpt-step", "3"], vocab_size=100)
