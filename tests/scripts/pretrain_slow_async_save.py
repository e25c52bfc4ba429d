"""``pretrain_ddk.py`` whose background checkpoint writer (``--async-save``) stalls after writing the
save of iteration ``$SLOW_SAVE_ITERATION`` (for ``$SLOW_SAVE_SECONDS``, default 600), so that a test
can kill the run while that save is written but not yet published. Each rank's writer creates the
file ``$SLOW_SAVE_MARKERS/rank<N>`` when it starts to stall. Same arguments as pretrain_ddk.py.
"""

import os
import sys
import time
from pathlib import Path


def stall_background_writer() -> None:
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    write = FileSystemWriterAsync.write_preloaded_data_multiproc  # runs in the forked writer process
    staging = f"iter_{int(os.environ['SLOW_SAVE_ITERATION']):07d}.tmp"
    seconds = float(os.environ.get("SLOW_SAVE_SECONDS", "600"))

    def stalled_write(transform_list, use_msc, rank, write_buckets, results_queue):
        write(transform_list, use_msc, rank, write_buckets, results_queue)
        if any(staging in str(path) for path, _, _ in write_buckets):
            Path(os.environ["SLOW_SAVE_MARKERS"], f"rank{rank}").touch()
            time.sleep(seconds)

    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(stalled_write)


if __name__ == "__main__":
    stall_background_writer()
    import pretrain_ddk

    sys.exit(pretrain_ddk.main(sys.argv[1:]))
