"""One SQLite writer at a time, handed over the moment the last one commits.

SQLite lets one connection write at a time. A writer that finds the lock taken waits in SQLite's
busy handler, which sleeps 1, 2, 5, 10 ... ms between tries, while the holder needs well under a
millisecond to record an instance and commit: with several associations over several listener
processes, each collision cost an association a few milliseconds of nothing (about 700 sleeps
of 3.4 ms on average in one 600-instance run over 4 associations and 2 processes). The listener's
record transactions therefore queue on an OS lock beside the database file (a thread lock within
the process, ``flock`` between processes), which wakes the next writer as soon as it is free.

Other writers (the worker, the API, the settle loop) do not queue here; they meet the listener's
transactions in SQLite's busy handler as before. PostgreSQL locks rows and wakes waiters itself:
no gate.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine


class SqliteWriteGate:
    """Serializes write transactions on one SQLite file across threads and processes."""

    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + ".write-gate")
        self._threads = threading.Lock()  # flock is held per open file, not per thread
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)

    @contextmanager
    def held(self) -> Iterator[None]:
        """This thread's turn to write; closed, a transaction still in flight goes ungated."""
        with self._threads:
            fd = self._fd
            if fd is None:
                yield
                return
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._threads:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def write_gate_for(engine: Engine) -> SqliteWriteGate | None:
    """A gate beside the engine's SQLite file; None for any other database (or an in-memory one)."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return None
    return SqliteWriteGate(Path(database))
