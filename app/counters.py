"""Counters of events that leave no row of their own (refused associations, oversize instances).

``/metrics`` is derived from the database on each scrape because the listener, the API and the
workers may be separate processes; these counters follow the same rule. A refusal is counted in
memory at once (a flood of refused connections must not become a flood of database writes) and
added to the ``event_counts`` row by a background flush every few seconds, and at shutdown.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import EventCount, utcnow

log = logging.getLogger(__name__)

#: Associations (or bare TCP connections) refused, by reason.
ASSOCIATIONS_REFUSED = "associations_refused"
#: Instances refused for their size, by source (dicom, upload).
INSTANCES_TOO_LARGE = "instances_too_large"


def add_counts(session_factory: sessionmaker[Session], counts: Counter[tuple[str, str]]) -> None:
    """Add to the database counters (one transaction; a concurrent first insert is retried)."""
    for attempt in range(3):
        try:
            with session_factory.begin() as session:
                for (name, label), n in counts.items():
                    done = cast("CursorResult[Any]", session.execute(
                        update(EventCount).where(EventCount.name == name, EventCount.label == label)
                        .values(count=EventCount.count + n, updated_at=utcnow()))).rowcount
                    if not done:
                        session.add(EventCount(name=name, label=label, count=n, updated_at=utcnow()))
            return
        except IntegrityError:  # another process inserted the same row first: update it now
            if attempt == 2:
                raise


def read_counts(session: Session) -> dict[str, dict[str, int]]:
    """Every counter, ``{name: {label: count}}``."""
    found: dict[str, dict[str, int]] = {}
    for name, label, count in session.execute(select(EventCount.name, EventCount.label, EventCount.count)):
        found.setdefault(name, {})[label] = int(count)
    return found


class EventCounters:
    """Process-local pending counts, flushed to the database by a daemon thread."""

    def __init__(self, session_factory: sessionmaker[Session], flush_seconds: float = 2.0) -> None:
        self.session_factory = session_factory
        self.flush_seconds = flush_seconds
        self._pending: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, name: str, label: str, n: int = 1) -> None:
        with self._lock:
            self._pending[(name, label)] += n

    def flush(self) -> None:
        """Write what is pending; kept in memory for the next try when the database is away."""
        with self._lock:
            pending, self._pending = self._pending, Counter()
        if not pending:
            return
        try:
            add_counts(self.session_factory, pending)
        except SQLAlchemyError as exc:
            log.warning("could not record event counters", extra={"error": type(exc).__name__})
            with self._lock:
                self._pending.update(pending)

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.flush_seconds):
                self.flush()

        self._thread = threading.Thread(target=loop, name="event-counters", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()
