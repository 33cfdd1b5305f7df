"""The DICOM listener's liveness heartbeat: a row per listener in ``listeners``.

Settling takes silence as "the sender is done", which holds only while the listener could
receive. The listener records since when it can (``up_since``: its start, or the end of a
database outage its heartbeat could not write through) and beats every few seconds; the
assembler (:func:`app.assembly.settle_clock_start`) pauses settling while no listener is alive
and counts silence from the latest ``up_since``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import datetime, timedelta
from functools import cache
from typing import Any, cast

from sqlalchemy import CursorResult, delete, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Listener, utcnow

log = logging.getLogger(__name__)

#: A listener row silent for this many heartbeat timeouts belongs to a process that is gone.
STALE_ROW_TIMEOUTS = 10


def process_name() -> str:
    """This process as records name it: "host:pid" (at most 64 characters, the host cut first)."""
    return _process_name(os.getpid())


@cache
def _process_name(pid: int) -> str:
    """Per pid: a forked child (a Celery prefork worker) gets its own name, not its parent's."""
    suffix = f":{pid}"
    return socket.gethostname()[:64 - len(suffix)] + suffix


def listener_name(ae_title: str, port: int) -> str:
    """One row per listener process: host, AE title, port and pid (several share a port)."""
    return f"{socket.gethostname()}:{ae_title}:{port}:{os.getpid()}"[:200]


def beat(session_factory: sessionmaker[Session], name: str, *, restarted: bool, now: datetime | None = None) -> None:
    """Write the heartbeat; ``restarted`` (start, or the first beat after failed ones) also
    moves ``up_since``: instances could not be received before it."""
    now = now or utcnow()
    with session_factory.begin() as session:
        values = {"heartbeat_at": now, **({"up_since": now} if restarted else {})}
        beaten = session.execute(update(Listener).where(Listener.name == name).values(**values))
        if not cast("CursorResult[Any]", beaten).rowcount:
            session.add(Listener(name=name, up_since=now, heartbeat_at=now))


class ListenerHeartbeat:
    """A daemon thread beating every ``interval`` seconds until :meth:`stop`; a clean stop removes
    the row (a listener stopped on purpose holds nothing up)."""

    def __init__(self, session_factory: sessionmaker[Session], name: str, interval: float, timeout: float) -> None:
        self.session_factory, self.name, self.interval, self.timeout = session_factory, name, interval, timeout
        self._stop, self._first = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="listener-heartbeat", daemon=True)

    def start(self) -> None:
        """The first beat before returning (the assembler's first pass must see this listener's
        start, or it would count the time it was down as silence), then the thread. Rows of
        listeners long dead (killed, so they never removed theirs) go first."""
        try:
            with self.session_factory.begin() as session:
                session.execute(delete(Listener).where(
                    Listener.heartbeat_at < utcnow() - timedelta(seconds=STALE_ROW_TIMEOUTS * self.timeout)))
        except Exception as exc:
            log.warning("stale listener rows not removed", extra={"error": type(exc).__name__})
        self._thread.start()
        self._first.wait(timeout=10)

    def _run(self) -> None:
        last_ok: datetime | None = None
        # Two missed beats in a row (database down, process suspended) are an outage: the next
        # good beat restarts the settle clock. One busy moment (SQLite locked) is not.
        outage = timedelta(seconds=min(self.timeout, 3 * self.interval))
        while not self._stop.is_set():
            restarted = last_ok is None or utcnow() - last_ok > outage
            try:
                beat(self.session_factory, self.name, restarted=restarted)
                last_ok = utcnow()
            except Exception as exc:  # database down: C-STORE answers 0xA700 meanwhile
                log.warning("listener heartbeat failed", extra={"error": type(exc).__name__})
            self._first.set()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            with self.session_factory.begin() as session:
                session.execute(delete(Listener).where(Listener.name == self.name))
        except Exception as exc:
            log.warning("listener row not removed", extra={"error": type(exc).__name__})
