"""Process pools for the data stages: workers that inherit no threads and end with the stage.

A stage runs MLflow's and tqdm's threads, and forking a process with threads can hand the child a
lock that is held forever; the workers therefore come from a fork server. A stage killed with
SIGKILL runs no cleanup, so each worker watches the stage's process itself and exits with it.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's), not the host's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def process_pool(workers: int, preload: list[str]) -> ProcessPoolExecutor:
    """`workers` processes from the fork server, which imports `__main__` and `preload` once."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", *preload])
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_end_with, initargs=(os.getpid(),))


def _end_with(stage_pid: int) -> None:
    # Ctrl-C reaches the whole process group: the stage handles it and shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_gone, args=(stage_pid,), name="end-with-stage", daemon=True).start()


def _exit_when_gone(pid: int) -> None:
    try:
        # A pidfd turns readable when the process ends (Linux 5.3+); no polling, no pid reuse.
        handle = os.pidfd_open(pid)
    except (AttributeError, OSError):
        handle = None
    if handle is not None:
        select.select([handle], [], [])
    else:
        while _alive(pid):
            time.sleep(1.0)
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
