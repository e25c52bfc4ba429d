"""Check a checkpoint offline: every file against its manifest, the index and metadata readable safely.

    python tools/verify_checkpoint.py ckpt/teacher                  # the tracker's latest iteration
    python tools/verify_checkpoint.py ckpt/student --iteration 2000 # another one
    python tools/verify_checkpoint.py ckpt/student/iter_0002000     # or the directory itself

Reads every byte once (checksums from ``ddk_manifest.json``) and parses ``ddk_checkpoint.json``, the
``.metadata`` index (restricted unpickler) and ``common.pt`` (``weights_only=True``); no code from the
checkpoint runs. Exit status 0: intact (or no manifest: a warning, older checkpoint); 1: damaged or
unsafe, with one line naming the file and the newest intact older checkpoint; 2: bad arguments.
Run it on a downloaded teacher before a long job.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", type=Path, help="checkpoint root (with its tracker) or an iter_* directory"
    )
    parser.add_argument("--iteration", type=int, default=None, help="check iter_<N> instead of the latest")
    return parser.parse_args(argv)


def verify(path: Path, iteration: int | None) -> str:
    from megatron_ddk import checkpoint_manifest
    from megatron_ddk.checkpoint_safety import read_dcp_metadata
    from megatron_ddk.checkpointing import load_common, read_metadata, resolve_checkpoint, verify_checkpoint

    resolved = resolve_checkpoint(path, flag="--load", step=iteration)
    meta = read_metadata(resolved)
    verify_checkpoint(resolved)
    index = read_dcp_metadata(resolved)
    load_common(resolved)
    files = checkpoint_manifest.read_manifest(resolved)
    what = (
        f"{len(files)} files match their checksums" if files is not None else "no manifest: files not checked"
    )
    return (
        f"{resolved}: iteration {meta.iteration}, {meta.model.num_layers} layers, hidden {meta.model.hidden_size}, "
        f"{len(index.state_dict_metadata)} saved entries; {what}"
    )


def main(argv: list[str] | None = None) -> int:
    from megatron_ddk.errors import CheckpointError

    args = parse_args(argv)
    try:
        print(verify(args.checkpoint, args.iteration))
    except CheckpointError as err:
        print(f"verify_checkpoint.py: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
