"""Helper processes of a rank exit with it, even when the rank is killed with SIGKILL.

dist_checkpointing's writer forks one process per write bucket at every save, and keeps its write
results in a queue served by a ``multiprocessing.Manager`` (a spawned server process that never
watches its parent). After a ``kill -9`` of the rank, the writers would go on writing into a staging
directory that the next run deletes or reuses, and the manager (and, through it, multiprocessing's
resource tracker) would live on indefinitely.

``tie_helpers_to_this_process`` (idempotent) fixes both:
- every child this process forks from its main thread gets ``PR_SET_PDEATHSIG = SIGKILL`` (Linux),
  so it dies with the rank (and exits at once if the rank died before the child could ask);
- the writer's results queue is an in-process ``queue.Queue`` instead of the manager's: saves are
  synchronous here, so the writer puts its results in this very process (its forked workers report
  through their own queues), and ``get_nowait`` right after ``put`` finds them.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1
_state = {"installed": False, "forking_pid": None, "from_main_thread": False}


def _before_fork() -> None:
    _state["forking_pid"] = os.getpid()
    _state["from_main_thread"] = threading.current_thread() is threading.main_thread()


def _in_child() -> None:
    # PDEATHSIG fires when the forking *thread* ends: only tie children forked by the main thread
    if not _state["from_main_thread"] or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != _state["forking_pid"]:  # the parent died before prctl: nobody will send the signal
        os._exit(1)


def tie_helpers_to_this_process() -> None:
    if _state["installed"]:
        return
    _state["installed"] = True
    os.register_at_fork(before=_before_fork, after_in_child=_in_child)
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
