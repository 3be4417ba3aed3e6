"""Run a command in a private ``/dev/shm``, where the machine allows it.

The command gets a new mount namespace (``unshare --mount``) with a fresh tmpfs on ``/dev/shm``,
so what it counts there is its own, whatever else runs beside it (parallel tests, another
simulator), and a new pid namespace, so that when it is killed (a timeout) no process it
started outlives it. It needs ``unshare`` and the right to mount (root, or a user namespace);
where either is missing the command runs as it is, and the caller is told so.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

_MOUNT_AND_EXEC = 'mount -t tmpfs -o size=2g mx-shm /dev/shm && exec "$@"'


def _in_private_shm(argv: list[str]) -> list[str]:
    # as root a new mount namespace is enough; anyone else needs a user namespace for it
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    # a pid namespace too: killed at a timeout, the command takes every process it started
    private = [
        "unshare",
        *user,
        "--pid",
        "--fork",
        "--kill-child",
        "--mount",
        "--propagation",
        "private",
    ]
    return [*private, "sh", "-c", _MOUNT_AND_EXEC, "sh", *argv]


@functools.cache
def private_shm_available() -> bool:
    """True when this machine lets a child run under its own ``/dev/shm``."""
    if shutil.which("unshare") is None:
        return False
    try:
        probe = subprocess.run(_in_private_shm(["true"]), capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


def run_isolated(argv: list[str], timeout_s: float) -> tuple[subprocess.CompletedProcess, bool]:
    """Run ``argv`` (output captured as text) in a private ``/dev/shm`` where available; returns
    the finished process and whether it was isolated. ``subprocess.TimeoutExpired`` past
    ``timeout_s``."""
    isolated = private_shm_available()
    command = _in_private_shm(argv) if isolated else argv
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    return done, isolated
