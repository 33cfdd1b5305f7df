"""Study assembly: decide when a study is complete, queue it once, and hand jobs to the broker.

A study is complete by one of two rules, the job's ``trigger`` says which:

* ``released``: an association that delivered a complete series (one the series rules would score:
  axial, uniform spacing, no gap, the chest coverage; ``app.series_selection``) was released and
  nothing arrived for ``settle_after_release_seconds`` since (:func:`mark_released`). A PACS
  sends a study and releases; waiting out the settle time then only delays the triage.
* ``settled``: no instance arrived for ``settle_seconds``. Everything else waits for this: a
  series with a missing slice, one cut short by an abort, a sender that keeps associations open.

Instances that arrive later reopen the study (``app.ingest``) and it is scored again. Queueing
writes a job row (the outbox) in the same transaction that moves the study to ``queued``; a
separate step hands pending jobs to the broker and marks them enqueued. If the broker is down the
job stays pending and the next pass retries, so nothing that settled is ever forgotten.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import case, false, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import (
    Export,
    ExportState,
    Instance,
    Job,
    JobState,
    JobTrigger,
    Listener,
    Series,
    Study,
    StudyState,
    utcnow,
)
from app.dicom.storage import remove_abandoned_incoming
from app.prior_lookups import retrieved_as_prior
from app.priority import queue_priority
from app.retention import purge_expired_quarantine, purge_expired_studies
from app.series_selection import SeriesCriteria, select_series
from app.settings import Settings
from models.dicom_headers import SliceHeader

log = logging.getLogger(__name__)

#: The shortest wait between two passes (a mark already due is queued by the next one).
MIN_PASS_SECONDS = 0.05
#: An incoming file this old belongs to no running write (a C-STORE answers within minutes).
ABANDONED_INCOMING_SECONDS = 3600.0

#: Hands (job id, queue priority) to the broker, returns the broker's task id; raises if it is down.
Enqueue = Callable[[int, int], str]
#: Hands a result id to the broker's export queue; raises when the broker is down.
EnqueueExport = Callable[[int], object]


def create_job(session: Session, study: Study, *, trigger: str, now: datetime) -> Job:
    """Queue ``study`` at its current version; older unfinished jobs of it are superseded."""
    session.execute(
        update(Job)
        .where(Job.study_id == study.id, Job.state.in_([JobState.pending.value, JobState.enqueued.value]))
        .values(state=JobState.superseded.value, finished_at=now)
    )
    job = Job(study_id=study.id, study_version=study.version, state=JobState.pending.value, trigger=trigger,
              created_at=now)
    session.add(job)
    study.state = StudyState.queued.value
    study.queued_at = now
    study.reason = None
    study.reason_code = None
    session.flush()
    return job


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
            updated = session.execute(
                update(Study)
                .where(Study.study_uid == study_uid, Study.state == StudyState.receiving.value,
                       Study.last_received_at <= now)
                .values(settle_due_at=now + timedelta(seconds=quiet_seconds))
            ).rowcount
        if updated:
            marked.append(study_uid)
    if marked:
        log.info("complete series delivered, settling soon",
                 extra={"studies": len(marked), "quiet_seconds": quiet_seconds})
    return marked


def queue_settled_studies(session_factory: sessionmaker[Session], settle_seconds: float,
                          now: datetime | None = None, receiving_since: datetime | None = None) -> list[int]:
    """Queue every study that settled by either rule (the module's docstring). Returns job ids.

    ``receiving_since``: since when instances could arrive (a listener's or the database's return
    after an outage); the silence before it is not counted, so nothing settles by silence until
    ``settle_seconds`` after it. A released complete series is news of its own and is not held.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=settle_seconds)
    counting = receiving_since is None or receiving_since <= cutoff
    quiet = (Study.last_received_at <= cutoff) if counting else false()
    released = Study.settle_due_at <= now
    settled = (Study.state == StudyState.receiving.value) & or_(quiet, released)
    job_ids: list[int] = []
    with session_factory() as session:
        candidates = session.execute(
            select(Study.id, Study.version, case((quiet, JobTrigger.settled.value), else_=JobTrigger.released.value))
            .where(settled)
            .order_by(Study.last_received_at)
        ).all()
    for study_id, version, trigger in candidates:
        with session_factory.begin() as session:
            # Claim the study only if nothing changed since we looked (another assembler, new data).
            claimed = session.execute(
                update(Study)
                .where(Study.id == study_id, Study.version == version, settled)
                .values(state=StudyState.queued.value, settle_due_at=None)
            ).rowcount
            if not claimed:
                continue
            study = session.get(Study, study_id)
            assert study is not None
            # A study reopened after a job already exists for this version (unusual) bumps it.
            if session.execute(select(Job.id).where(Job.study_id == study_id, Job.study_version == version)).first():
                study.version = version + 1
            job_ids.append(create_job(session, study, trigger=trigger, now=now).id)
    if job_ids:
        log.info("studies settled and queued", extra={"count": len(job_ids)})
    return job_ids


def dispatch_pending_jobs(session_factory: sessionmaker[Session], enqueue: Enqueue, limit: int = 100) -> int:
    """Hand pending jobs to the broker (the outbox relay). Returns how many were handed over."""
    with session_factory() as session:
        pending = session.execute(
            select(Job.id, Job.trigger, Study.severity_band, retrieved_as_prior())
            .join(Study, Study.id == Job.study_id)
            .where(Job.state == JobState.pending.value)
            .order_by(Job.id)
            .limit(limit)
        ).all()
    sent = 0
    for job_id, trigger, previous_band, retrieved_prior in pending:
        try:
            task_id = enqueue(job_id, queue_priority(trigger, previous_band, retrieved_prior))
        except Exception as exc:  # broker down: leave the job pending for the next pass
            log.warning("broker unavailable, job left pending", extra={"job_id": job_id, "error": type(exc).__name__})
            break
        with session_factory.begin() as session:
            # A fast worker may have claimed the job already: record the hand-over anyway, and
            # move the state on only from pending.
            session.execute(
                update(Job).where(Job.id == job_id)
                .values(celery_task_id=task_id, enqueued_at=utcnow(), sends=Job.sends + 1)
            )
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == JobState.pending.value)
                .values(state=JobState.enqueued.value)
            )
        sent += 1
    return sent


def request_rescore(session_factory: sessionmaker[Session], study_uid: str) -> int | None:
    """Queue a new version of a study on demand. Returns the job id, or None if unknown."""
    now = utcnow()
    with session_factory.begin() as session:
        study = session.execute(
            select(Study).where(Study.study_uid == study_uid).with_for_update()
        ).scalar_one_or_none()
        if study is None:
            return None
        study.version += 1
        return create_job(session, study, trigger=JobTrigger.rescore.value, now=now).id


def release_running_jobs(session_factory: sessionmaker[Session]) -> int:
    """At the start of the embedded service, whose one worker is its own child: a job still
    `running` was cut off when the service last stopped. It goes back to the outbox now, not after
    the processing timeout (the embedded broker never hands a fetched message out again).
    Returns how many."""
    with session_factory.begin() as session:
        released = session.execute(
            update(Job).where(Job.state == JobState.running.value)
            .values(state=JobState.pending.value, error="re-queued: the service stopped while it ran")
        ).rowcount
    if released:
        log.warning("jobs cut off by the last stop re-queued", extra={"count": released})
    return released


def requeue_stale_jobs(session_factory: sessionmaker[Session], timeout_seconds: float,
                       now: datetime | None = None, *, heartbeat_timeout_seconds: float | None = None,
                       resend_seconds: float | None = None) -> int:
    """Put back jobs whose worker vanished or whose broker message was lost. Returns how many.

    A running job goes back when its worker's heartbeat (its start, before the first beat) is
    older than ``heartbeat_timeout_seconds``: the worker died (a live one beats every few seconds,
    and stops beating after the processing timeout, so a hung scoring goes back too). An enqueued
    job no worker claimed goes back after ``resend_seconds``, doubling with each send (the message
    may be lost, or only waiting in a long queue: the backoff bounds the duplicates). The claim
    (:func:`worker.jobs.claim_job`) makes a second delivery harmless: it stops while the holder
    beats. Either timeout defaults to ``timeout_seconds``.
    """
    now = now or utcnow()
    heartbeat_cutoff = now - timedelta(seconds=heartbeat_timeout_seconds or timeout_seconds)
    resend = resend_seconds or timeout_seconds
    with session_factory() as session:
        enqueued = session.execute(
            select(Job.id, Job.enqueued_at, Job.sends)
            .where(Job.state == JobState.enqueued.value, Job.enqueued_at <= now - timedelta(seconds=resend))
        ).all()
    # The n-th send waited resend x 2^(n-1); at most the processing timeout between sends.
    lost = [job_id for job_id, enqueued_at, sends in enqueued
            if enqueued_at <= now - timedelta(seconds=min(resend * 2 ** max(sends - 1, 0),
                                                          max(resend, timeout_seconds)))]
    with session_factory.begin() as session:
        dead = session.execute(
            update(Job)
            .where(Job.state == JobState.running.value,
                   func.coalesce(Job.heartbeat_at, Job.started_at) <= heartbeat_cutoff)
            .values(state=JobState.pending.value,
                    error="re-queued: no worker finished it in time (its worker stopped beating)")
        ).rowcount
        resent = session.execute(
            update(Job).where(Job.id.in_(lost), Job.state == JobState.enqueued.value)
            .values(state=JobState.pending.value, error="re-queued: no worker claimed it (broker message lost?)")
        ).rowcount if lost else 0
    if dead:
        log.warning("jobs of lost workers re-queued", extra={"count": dead})
    if resent:
        log.warning("unclaimed enqueued jobs handed to the broker again", extra={"count": resent})
    return dead + resent


def dispatch_overdue_exports(session_factory: sessionmaker[Session], enqueue_export: EnqueueExport,
                             grace_seconds: float, now: datetime | None = None, limit: int = 100) -> int:
    """Hand results whose pending exports are overdue back to the broker (the exports' outbox
    relay). Returns how many results were handed over.

    An export is overdue once its next attempt is ``grace_seconds`` late: its task was never
    queued (the broker was down after the scoring) or the broker lost it (a Redis restart), since
    a task the broker still holds runs before then and moves ``next_attempt_at`` on. A late task
    that runs after all only repeats a send; the PACS receives the same SOP instance again.
    Exports held back (``export_hold_seconds``) are due at the hold's end, so they are overdue
    only ``grace_seconds`` after it; superseded ones are never pending again.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=grace_seconds)
    overdue = (Export.state == ExportState.pending.value) & (
        Export.next_attempt_at.is_(None) | (Export.next_attempt_at <= cutoff))
    with session_factory() as session:
        result_ids = session.execute(
            select(Export.result_id).where(overdue).group_by(Export.result_id).order_by(Export.result_id).limit(limit)
        ).scalars().all()
    sent = 0
    for result_id in result_ids:
        try:
            enqueue_export(result_id)
        except Exception as exc:  # broker down: left overdue for the next pass
            log.warning("broker unavailable, exports left pending",
                        extra={"result_id": result_id, "error": type(exc).__name__})
            break
        with session_factory.begin() as session:
            session.execute(update(Export).where(Export.result_id == result_id, overdue).values(next_attempt_at=now))
        sent += 1
    if sent:
        log.warning("overdue exports handed to the broker again", extra={"results": sent})
    return sent


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


def assembler_pass(session_factory: sessionmaker[Session], enqueue: Enqueue, settings: Settings,
                   enqueue_export: EnqueueExport | None = None, resumed_at: datetime | None = None) -> None:
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
    dispatch_pending_jobs(session_factory, enqueue)
    if enqueue_export is not None:
        dispatch_overdue_exports(session_factory, enqueue_export, settings.processing_timeout_seconds)


def run_assembler(session_factory: sessionmaker[Session], enqueue: Enqueue, settings: Settings,
                  stop: threading.Event, enqueue_export: EnqueueExport | None = None) -> None:
    """Loop until ``stop`` is set; a failing pass (database down) is logged and retried.

    Housekeeping (purging expired files) runs in the same loop, less often.
    """
    next_purge = 0.0
    failing, resumed_at = False, None
    while not stop.is_set():
        try:
            if failing:  # the first pass since the database came back (may fail again)
                resumed_at = utcnow()
            assembler_pass(session_factory, enqueue, settings, enqueue_export, resumed_at)
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
