"""A supervised child ends with its parent: `cttriage serve` killed by SIGKILL (or crashed) must
not leave its Celery worker running, re-parented to PID 1, taking jobs for a service that is gone.

Two layers: on Linux the kernel signals the child when its parent dies (``prctl(PR_SET_PDEATHSIG)``);
everywhere a watchdog thread polls ``os.getppid()``. Either sends SIGTERM (Celery's warm shutdown);
a child still alive after :data:`STOP_GRACE_SECONDS` is killed outright.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

#: Set by the supervisor in its child's environment: the pid the child must outlive no longer than.
PARENT_PID_ENV = "CTTRIAGE_SUPERVISOR_PID"
#: How often the watchdog looks at its parent.
POLL_SECONDS = 1.0
#: A warm shutdown gets this long before the child kills itself (the supervisor's stop allows as much).
STOP_GRACE_SECONDS = 20.0
_PR_SET_PDEATHSIG = 1


def parent_pid_from_env() -> int | None:
    """The supervisor's pid when this process was started by one, else None."""
    value = os.environ.get(PARENT_PID_ENV, "")
    return int(value) if value.isdigit() else None


def exit_with_parent(parent_pid: int | None, poll_seconds: float = POLL_SECONDS,
                     grace_seconds: float = STOP_GRACE_SECONDS) -> None:
    """Arrange for this process to stop when ``parent_pid`` is no longer its parent (no-op for None).

    Call it early in the child: a parent that died before the call is noticed at once.
    """
    if parent_pid is None:
        return
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the watchdog alone does it
            pass
    thread = threading.Thread(target=_watch, args=(parent_pid, poll_seconds, grace_seconds),
                              name="parent-watch", daemon=True)
    thread.start()


def _watch(parent_pid: int, poll_seconds: float, grace_seconds: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_seconds)
    log.warning("supervising process is gone; stopping", extra={"parent_pid": parent_pid})
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_seconds)
    os.kill(os.getpid(), signal.SIGKILL)
