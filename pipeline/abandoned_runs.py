"""Runs left RUNNING by a process that died: who owns an open run, and closing the abandoned ones.

A stage killed with SIGKILL, or one that lost the tracking server, cannot close its MLflow run.
Every run therefore names the process that has it open (tags `host`, `pid`, `pid_started`,
`pid_namespace`, `status_if_abandoned`), and each new stage run closes the RUNNING runs of its
experiment whose process on this machine is gone. A run whose process still lives (a queued
experiment training beside this one) is never touched; nor is a run opened on another machine,
whose processes cannot be seen from here.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import psutil

ABANDONED_TAG = "abandoned"


def _pid_namespace() -> str:
    """The PID namespace of this process (Linux): two containers on one host can reuse a pid."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def owner_tags(status_if_abandoned: str) -> dict[str, str]:
    """Tags naming this process as the one holding a run open, and the status the run gets if
    this process dies with it open (FAILED, or the status of a finished run it reopened)."""
    me = psutil.Process()
    tags = {
        "host": socket.gethostname(),
        "pid": str(me.pid),
        "pid_started": f"{me.create_time():.2f}",
        "status_if_abandoned": status_if_abandoned,
    }
    if _pid_namespace():
        tags["pid_namespace"] = _pid_namespace()
    return tags


def _owner_alive(pid: int, started: str) -> bool:
    """Whether the process that opened the run still runs: same pid *and* same start time, since
    pids are reused. When in doubt (no permission to look), it counts as alive."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(process.create_time() - float(started)) < 1.0
    except psutil.NoSuchProcess:
        return False
    except (psutil.AccessDenied, ValueError):
        return True


def abandoned(run: Any) -> bool:
    """A RUNNING run opened by a process of this machine (same host, same pid namespace) that is gone."""
    tags = run.data.tags
    if (
        run.info.status != "RUNNING"
        or tags.get("host") != socket.gethostname()
        or tags.get("pid_namespace", "") != _pid_namespace()
    ):
        return False
    if not tags.get("pid", "").isdigit() or "pid_started" not in tags:
        return False  # opened by code that did not record its process: nothing to judge by
    return not _owner_alive(int(tags["pid"]), tags["pid_started"])


def close_abandoned_runs(client: Any, experiment_id: str, closing_stage: str) -> list[str]:
    """Close the abandoned runs of an experiment; returns their ids.

    A run gets its `status_if_abandoned` (FAILED, or FINISHED for a finished training that a dead
    evaluate had reopened) and a tag `abandoned` saying what happened and who noticed."""
    host = socket.gethostname()
    candidates = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.host = '{host}'",
        max_results=1000,
    )
    closed = []
    for candidate in filter(abandoned, candidates):
        run = client.get_run(
            candidate.info.run_id
        )  # as it is now: a live process may have reopened it meanwhile
        if not abandoned(run):
            continue
        tags = run.data.tags
        status = (
            tags.get("status_if_abandoned")
            if tags.get("status_if_abandoned") in ("FINISHED", "FAILED", "KILLED")
            else "FAILED"
        )
        when = time.strftime("%Y-%m-%d %H:%M:%S %z")
        note = (
            f"process {tags['pid']} on {host} ended with this run still open "
            "(killed, or it lost the tracking server); "
            f"marked {status} on {when} by the next `{closing_stage}` stage run on that machine"
        )
        client.set_tag(run.info.run_id, ABANDONED_TAG, note)
        client.set_terminated(run.info.run_id, status)
        closed.append(run.info.run_id)
    return closed
