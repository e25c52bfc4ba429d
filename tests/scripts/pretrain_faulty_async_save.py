"""``pretrain_ddk.py`` whose background checkpoint writer (``--async-save``) misbehaves on the save of
iteration ``$ASYNC_SAVE_FAULT_ITERATION`` (default: every save), after writing its shards, as
``$ASYNC_SAVE_FAULT`` says:

- ``stall``: it sleeps (10 minutes) instead of reporting, after creating ``$ASYNC_SAVE_FAULT_MARKERS/rank<N>``,
  so that a test can kill the run while the save is written but not yet published;
- ``die``: it exits without reporting its results (what a writer killed by the OOM killer does);
- ``slow``: it reports its results 3 seconds late (a slow file system).

Same arguments as pretrain_ddk.py.
"""

import os
import sys
import time
from pathlib import Path


def misbehave_in_background_writer() -> None:
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    write = FileSystemWriterAsync.write_preloaded_data_multiproc  # runs in the forked writer process
    iteration = os.environ.get("ASYNC_SAVE_FAULT_ITERATION")
    staging = f"iter_{int(iteration):07d}.tmp" if iteration else ".tmp"
    fault = os.environ["ASYNC_SAVE_FAULT"]

    def faulty_write(transform_list, use_msc, rank, write_buckets, results_queue):
        if not any(staging in str(path) for path, _, _ in write_buckets):
            return write(transform_list, use_msc, rank, write_buckets, results_queue)
        if fault == "slow":
            time.sleep(3)
            return write(transform_list, use_msc, rank, write_buckets, results_queue)
        write(transform_list, use_msc, rank, write_buckets, _Unread())
        if fault == "die":
            os._exit(1)
        Path(os.environ["ASYNC_SAVE_FAULT_MARKERS"], f"rank{rank}").touch()
        time.sleep(600)

    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(faulty_write)


class _Unread:
    """A results queue that drops what the writer reports."""

    def put(self, _item) -> None:
        pass


if __name__ == "__main__":
    misbehave_in_background_writer()
    import pretrain_ddk

    sys.exit(pretrain_ddk.main(sys.argv[1:]))
