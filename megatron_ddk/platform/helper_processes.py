"""Helper processes of a rank exit with it, even when the rank is killed with SIGKILL.

dist_checkpointing's writer forks one process per write bucket at every save, and keeps its write
results in a queue served by a ``multiprocessing.Manager`` (a spawned server process that never
watches its parent). After a ``kill -9`` of the rank, the writers would go on writing into a staging
directory that the next run deletes or reuses, and the manager (and, through it, multiprocessing's
resource tracker) would live on indefinitely.

``tie_helpers_to_this_process`` (idempotent) fixes both:
- every child this process forks from its main thread gets ``PR_SET_PDEATHSIG = SIGKILL`` (Linux),
  so it dies with the rank (and exits at once if the rank died before the child could ask);
- the writer's results queue (``use_write_results_queue``) is chosen per save. A synchronous save
  writes from this very process (its forked workers report through their own queues), so an
  in-process ``queue.Queue`` serves, and ``get_nowait`` right after ``put`` finds the results. A
  background save (``--async-save``) writes from a forked process, whose results must cross back: a
  manager queue, as megatron-core uses, but its server is *forked* from this process's main thread
  (so it is tied like the writers) rather than spawned. A plain ``multiprocessing.Queue`` would not
  do: a writer whose results exceed the pipe's buffer could not exit until this process read them,
  and this process waits for it to exit before reading.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import signal
import sys
import threading
from typing import Any

_PR_SET_PDEATHSIG = 1
_state = {"installed": False, "forking_pid": None, "from_main_thread": False}
_queues: dict[str, Any] = {}


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
    use_write_results_queue(background=False)


def use_write_results_queue(*, background: bool) -> None:
    """Make dist_checkpointing's next save report its write results through the queue that fits it
    (see the module docstring); called by the main thread before each save."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    kind = "background" if background else "in_process"
    if kind not in _queues:
        if background:
            tie_helpers_to_this_process()  # the manager's server is a forked child: it must be tied too
            manager = multiprocessing.get_context("fork").Manager()
            _queues["manager"] = manager  # keeps the server alive; it shuts down at exit (or dies with us)
            _queues[kind] = manager.Queue()
        else:
            _queues[kind] = queue.Queue()
    filesystem_async._results_queue = _queues[kind]
