"""Study assembly: decide when a study is complete, queue it once, and hand jobs to the broker.

A study is complete by one of two rules, the job's ``trigger`` says which:

* ``released``: an association that delivered a complete series (one the series rules would score:
  axial, uniform spacing, no gap, the chest coverage; ``app.series_selection``) was released and
  nothing arrived for ``settle_after_release_seconds`` since (:func:`mark_released`). A PACS
  sends a study and releases; waiting out the settle time then only delays the triage.
* ``settled``: no instance arrived for ``settle_seconds``. Everything else waits for this: a
  series with a missing slice, one cut short by an abort, a sender that keeps associations open.

Instances that arrive later reopen the study (``app.ingest``) and it is scored again. Each pass
queues the settled studies (:func:`app.lifecycle.queue_settled_studies`, a job row written with
the study's move to ``queued``), puts back lost jobs, and relays the outbox (:mod:`app.outbox`)
to the :class:`app.broker.Broker`; housekeeping (retention) runs in the same loop, less often.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.broker import Broker
from app.db.models import Instance, Listener, Series, Study, StudyState, utcnow
from app.dicom.storage import remove_abandoned_incoming
from app.lifecycle import queue_settled_studies, requeue_stale_jobs
from app.outbox import dispatch_overdue_exports, dispatch_pending_jobs
from app.retention import purge_expired_quarantine, purge_expired_studies
from app.series_selection import SeriesCriteria, select_series
from app.settings import Settings
from models.dicom_headers import SliceHeader

log = logging.getLogger(__name__)

#: The shortest wait between two passes (a mark already due is queued by the next one).
MIN_PASS_SECONDS = 0.05
#: An incoming file this old belongs to no running write (a C-STORE answers within minutes).
ABANDONED_INCOMING_SECONDS = 3600.0

def settle_clock_start(session_factory: sessionmaker[Session], listener_timeout_seconds: float,
                       now: datetime | None = None) -> tuple[bool, datetime | None]:
    """(paused, since): silence counts only while a listener could receive. Paused while no
    listener row is alive; ``since`` is the latest ``up_since`` of the live ones (a listener that
    came back after being down, or after a database outage). No rows (uploads only): (False, None).
    """
    now = now or utcnow()
    with session_factory() as session:
        rows = session.execute(select(Listener.up_since, Listener.heartbeat_at)).all()
    if not rows:
        return False, None
    alive = [up for up, beat in rows if beat >= now - timedelta(seconds=listener_timeout_seconds)]
    if not alive:
        return True, None
    return False, max(alive)


def mark_released(session_factory: sessionmaker[Session], delivered: dict[str, set[str]],
                  criteria: SeriesCriteria, quiet_seconds: float, now: datetime | None = None) -> list[str]:
    """An association was released after delivering ``delivered`` (study UID -> its series UIDs):
    each study with one of those series complete settles ``quiet_seconds`` from now, unless an
    instance arrives meanwhile (``app.ingest`` clears the mark). Returns the study UIDs marked.

    Complete means the series rules would score the series as it stands; a series with a gap, a
    slab or a localizer is not, and its study waits for the full settle time. ``now`` is taken
    before the headers are read: an instance recorded after it fails the update's condition.
    """
    now = now or utcnow()
    marked: list[str] = []
    for study_uid, series_uids in delivered.items():
        with session_factory() as session:
            rows = session.execute(
                select(Instance.headers)
                .join(Series, Series.id == Instance.series_id)
                .join(Study, Study.id == Instance.study_id)
                .where(Study.study_uid == study_uid, Study.state == StudyState.receiving.value,
                       Series.series_uid.in_(series_uids))
            ).scalars().all()
        headers = [SliceHeader.from_dict(h) for frames in rows for h in frames]
        if not headers or select_series(headers, criteria).chosen is None:
            continue
        with session_factory.begin() as session:
            updated = cast("CursorResult[Any]", session.execute(
                update(Study)
                .where(Study.study_uid == study_uid, Study.state == StudyState.receiving.value,
                       Study.last_received_at <= now)
                .values(settle_due_at=now + timedelta(seconds=quiet_seconds))
            )).rowcount
        if updated:
            marked.append(study_uid)
    if marked:
        log.info("complete series delivered, settling soon",
                 extra={"studies": len(marked), "quiet_seconds": quiet_seconds})
    return marked


def next_settle_due(session_factory: sessionmaker[Session]) -> datetime | None:
    """The earliest release mark of a study still receiving (None: no study is marked)."""
    with session_factory() as session:
        return session.execute(
            select(func.min(Study.settle_due_at)).where(Study.state == StudyState.receiving.value)
        ).scalar_one_or_none()


def seconds_to_next_pass(session_factory: sessionmaker[Session], interval: float) -> float:
    """``interval``, or less when a marked study is due sooner: a released series is queued at
    its due time, not up to a pass later."""
    due = next_settle_due(session_factory)
    if due is None:
        return interval
    return min(interval, max(MIN_PASS_SECONDS, (due - utcnow()).total_seconds()))


def assembler_pass(session_factory: sessionmaker[Session], broker: Broker, settings: Settings,
                   resumed_at: datetime | None = None) -> None:
    """One round of the assembler: settle, recover lost jobs, relay the outboxes (jobs, exports).

    ``resumed_at``: when the assembler's own passes started succeeding again after the database
    was unreachable; like a listener's return, settling counts silence only from then.
    """
    paused, since = settle_clock_start(session_factory, settings.listener_heartbeat_timeout_seconds)
    if paused:  # no listener alive: silence means nothing, a released complete series still does
        since = utcnow()
    if resumed_at is not None:
        since = max(since, resumed_at) if since is not None else resumed_at
    queue_settled_studies(session_factory, settings.settle_seconds, receiving_since=since)
    requeue_stale_jobs(session_factory, settings.processing_timeout_seconds,
                       heartbeat_timeout_seconds=settings.job_heartbeat_timeout_seconds,
                       resend_seconds=settings.enqueued_resend_seconds)
    dispatch_pending_jobs(session_factory, broker.enqueue_scoring)
    if settings.export_enabled:
        dispatch_overdue_exports(session_factory, broker.enqueue_export, settings.processing_timeout_seconds)


def run_assembler(session_factory: sessionmaker[Session], broker: Broker, settings: Settings,
                  stop: threading.Event) -> None:
    """Loop until ``stop`` is set; a failing pass (database down) is logged and retried.

    Housekeeping (purging expired files) runs in the same loop, less often.
    """
    next_purge = 0.0
    failing, resumed_at = False, None
    while not stop.is_set():
        try:
            if failing:  # the first pass since the database came back (may fail again)
                resumed_at = utcnow()
            assembler_pass(session_factory, broker, settings, resumed_at)
            failing = False
            if time.monotonic() >= next_purge:
                purge_expired_studies(session_factory, settings.storage_root, settings.retention_days)
                purge_expired_quarantine(session_factory, settings.quarantine_retention_days)
                remove_abandoned_incoming(settings.storage_root, ABANDONED_INCOMING_SECONDS)
                next_purge = time.monotonic() + settings.retention_check_interval_seconds
            wait = seconds_to_next_pass(session_factory, settings.assembler_interval_seconds)
        except Exception:
            failing = True
            wait = settings.assembler_interval_seconds
            log.exception("assembler pass failed; retrying")
        stop.wait(wait)
