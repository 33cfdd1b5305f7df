"""Children the service keeps running: the Celery worker of ``cttriage serve`` and the listener
processes that share the DICOM port. A child that dies is started again; the service's stop
stops it (SIGTERM, then SIGKILL after the grace period). Children started with the supervisor's
pid in their environment (``app.parent_watch``) stop by themselves when it is gone.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field

from app.parent_watch import PARENT_PID_ENV, STOP_GRACE_SECONDS
from app.settings import Settings

log = logging.getLogger(__name__)

#: How long a stop waits for a killed child to be gone.
KILLED_REAP_SECONDS = 5.0


@dataclass
class SupervisedProcess:
    """A child process restarted when it dies, until stopped."""

    command: list[str]
    env: dict[str, str]
    #: What the child is, for the log ("worker", "listener 2").
    name: str = "child"
    #: File descriptors the child inherits (a listening socket shared by listener processes).
    pass_fds: tuple[int, ...] = ()
    restart_delay: float = 2.0
    #: True once the service is shutting down: a child that exits then (Ctrl-C reaches the whole
    #: process group, the child first) is not restarted while the API drains its streams.
    stopping: Callable[[], bool] = lambda: False
    _proc: subprocess.Popen[bytes] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"supervisor-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:  # stop() between the check and the start would leave a child running
                if self._stop.is_set() or self.stopping():
                    return
                # The same process group as the service: whatever stops the group stops the child.
                self._proc = subprocess.Popen(self.command, env=self.env, pass_fds=self.pass_fds)
            code = self._proc.wait()
            if not self._stop.is_set() and not self.stopping():
                log.warning("child process exited; restarting", extra={"child": self.name, "exit_code": code})
                self._stop.wait(self.restart_delay)

    @property
    def pid(self) -> int | None:
        """The running child's pid (None before the first start)."""
        return self._proc.pid if self._proc is not None else None

    def stop(self, timeout: float = STOP_GRACE_SECONDS) -> None:
        stop_all([self], timeout)

    def _terminate(self) -> subprocess.Popen[bytes] | None:
        """No more restarts, and SIGTERM to the running child; the child, if it still runs."""
        with self._lock:
            self._stop.set()
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return None
        proc.terminate()
        return proc


def stop_all(children: Iterable[SupervisedProcess], timeout: float = STOP_GRACE_SECONDS) -> None:
    """Stop ``children`` together: each gets SIGTERM before any is waited for, so the service's
    stop takes as long as its slowest child (a worker finishing its task), not their sum; a
    child still running ``timeout`` seconds after its SIGTERM is killed."""
    deadline = time.monotonic() + timeout
    running = [proc for proc in (child._terminate() for child in children) if proc is not None]
    for proc in running:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            with suppress(subprocess.TimeoutExpired):  # a child stuck in the kernel: do not hang the stop
                proc.wait(KILLED_REAP_SECONDS)


def child_environment(settings: Settings) -> dict[str, str]:
    """Environment for a child (worker, listener): the parent's resolved URLs, so both see the same state."""
    env = dict(os.environ)
    env.update({
        "CTTRIAGE_DATABASE_URL": settings.sqlalchemy_url,
        "CTTRIAGE_BROKER_URL": settings.celery_broker_url,
        "CTTRIAGE_STORAGE_DIR": str(settings.storage_root.resolve()),
        "CTTRIAGE_DATA_DIR": str(settings.data_dir.resolve()),
        # The child stops when this process is gone, however it went (app.parent_watch).
        PARENT_PID_ENV: str(os.getpid()),
    })
    return env
