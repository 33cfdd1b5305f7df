"""Every change of a study's, a job's or an export's state: the one module that moves them.

Study: ``receiving`` (a new instance reopens a study that left it, as a new version:
:data:`STUDY_REOPENED`) -> ``queued`` (:func:`queue_settled_studies`, :func:`request_rescore`, each
writing a pending job in the same transaction) -> ``processing`` (:func:`claim_job`) -> ``scored``
(:func:`finish_scored`), ``rejected`` or ``failed`` (:func:`finish_with_error`).

Job: ``pending`` (the outbox, :mod:`app.outbox` hands it to the broker) -> ``enqueued`` ->
``running`` (claimed; back to ``pending`` by :func:`release_job`, :func:`release_running_jobs`,
:func:`requeue_stale_jobs`) -> ``done``, ``failed`` or ``superseded`` (a newer version was queued).

Files: a finished study's files go after the retention period (:func:`mark_files_purged`, then
``app.retention`` removes them); a new instance brings the study back to ``receiving``.

Export: ``pending`` (:func:`add_exports`, with its result; :func:`reset_export`, an admin's retry)
-> ``sent`` or ``failed`` (:mod:`worker.exports`), or ``superseded`` by a newer result.

Every write of a job's study goes through :func:`study_of`: it lands only while the study is still
at the job's version, so a late instance or a rescore turns an outdated job's writes into no-ops.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any, cast

from pydicom.uid import generate_uid
from sqlalchemy import CursorResult, Update, bindparam, case, false, func, null, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import (
    Export,
    ExportKind,
    ExportState,
    Job,
    JobState,
    JobTrigger,
    Result,
    Study,
    StudyState,
    utcnow,
)
from app.db.upsert import insert_ignore
from app.priors import compare_with_prior
from app.settings import Settings
from models.priority import effective_band, priority_score

log = logging.getLogger(__name__)

FINISHED = (JobState.done.value, JobState.superseded.value, JobState.failed.value)
#: Study states whose files retention may remove (``app.retention``); failed studies wait for an admin.
PURGEABLE = (StudyState.scored.value, StudyState.rejected.value)

# Receiving: the study statements of app.ingest's record_instance, run with its parameters (sid,
# now, by). A plain re-send keeps a study that is still arriving from settling; one that has
# settled keeps its "last received" (a PACS forwarding the same study again brings nothing new).
_STUDIES = Study.__table__
STUDY_TOUCHED = (
    update(_STUDIES)
    .where(_STUDIES.c.id == bindparam("sid"), _STUDIES.c.state == StudyState.receiving.value)
    .values(last_received_at=bindparam("now"), settle_due_at=null())
)
# A new instance for a study that already left `receiving` reopens it as a new version to score;
# so does one that moved away to another study; unless it can never be scored (STUDY_ADDED_TO).
# (Every SET expression reads the row as it was, on PostgreSQL and SQLite alike.)
_LEFT_RECEIVING = _STUDIES.c.state != StudyState.receiving.value
STUDY_REOPENED = (
    update(_STUDIES)
    .where(_STUDIES.c.id == bindparam("sid"))
    .values(
        instance_count=_STUDIES.c.instance_count + bindparam("by"),
        last_received_at=bindparam("now"),
        settle_due_at=null(),  # more is arriving: a release settles it again (app.assembly)
        version=case((_LEFT_RECEIVING, _STUDIES.c.version + 1), else_=_STUDIES.c.version),
        reason=case((_LEFT_RECEIVING, null()), else_=_STUDIES.c.reason),
        reason_code=case((_LEFT_RECEIVING, null()), else_=_STUDIES.c.reason_code),
        state=StudyState.receiving.value,
        files_purged_at=null(),  # retention removed the earlier files: these are kept again
    )
)
# An instance that cannot change the scoring (ours sent back, not CT): counted, nothing reopened.
STUDY_ADDED_TO = (
    update(_STUDIES)
    .where(_STUDIES.c.id == bindparam("sid"))
    .values(instance_count=_STUDIES.c.instance_count + bindparam("by"), last_received_at=bindparam("now"),
            settle_due_at=null())
)


def study_changed(never_scored: bool) -> Update:
    """The study update for one instance more or less: reopening only when it may change the scoring."""
    return STUDY_ADDED_TO if never_scored else STUDY_REOPENED


# --- queueing ----------------------------------------------------------------------------------


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
            claimed = cast("CursorResult[Any]", session.execute(
                update(Study)
                .where(Study.id == study_id, Study.version == version, settled)
                .values(state=StudyState.queued.value, settle_due_at=None)
            )).rowcount
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
        released = cast("CursorResult[Any]", session.execute(
            update(Job).where(Job.state == JobState.running.value)
            .values(state=JobState.pending.value, error="re-queued: the service stopped while it ran")
        )).rowcount
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
    (:func:`claim_job`) makes a second delivery harmless: it stops while the holder
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
    # (enqueued_at is never NULL here: the query's comparison leaves such rows out.)
    lost = [job_id for job_id, enqueued_at, sends in enqueued
            if enqueued_at is not None and enqueued_at <= now - timedelta(seconds=min(resend * 2 ** max(sends - 1, 0),
                                                          max(resend, timeout_seconds)))]
    with session_factory.begin() as session:
        dead = cast("CursorResult[Any]", session.execute(
            update(Job)
            .where(Job.state == JobState.running.value,
                   func.coalesce(Job.heartbeat_at, Job.started_at) <= heartbeat_cutoff)
            .values(state=JobState.pending.value,
                    error="re-queued: no worker finished it in time (its worker stopped beating)")
        )).rowcount
        resent = cast("CursorResult[Any]", session.execute(
            update(Job).where(Job.id.in_(lost), Job.state == JobState.enqueued.value)
            .values(state=JobState.pending.value, error="re-queued: no worker claimed it (broker message lost?)")
        )).rowcount if lost else 0
    if dead:
        log.warning("jobs of lost workers re-queued", extra={"count": dead})
    if resent:
        log.warning("unclaimed enqueued jobs handed to the broker again", extra={"count": resent})
    return dead + resent


# --- running ----------------------------------------------------------------------------------


def study_of(job: Job) -> Update:
    """An UPDATE of the job's study that lands only while the study is still at the job's version:
    a late instance or a rescore makes every write of an outdated job a no-op."""
    return (update(Study).where(Study.id == job.study_id, Study.version == job.study_version)
            .execution_options(synchronize_session=False))


def claim_job(session_factory: sessionmaker[Session], job_id: int, worker: str, *, max_attempts: int,
              heartbeat_timeout_seconds: float | None = None, now: datetime | None = None) -> Job | None:
    """Mark the job running and its study processing; None when there is nothing to do.

    The claim is the lock: a job ``running`` whose holder's heartbeat is younger than
    ``heartbeat_timeout_seconds`` is left alone (a second delivery, say Celery's restored
    unacknowledged task next to the assembler's re-send, stops here); one whose heartbeat is older,
    or was let go (none), is taken over as a new attempt. A job already tried ``max_attempts``
    times fails its study instead: each attempt ended without an outcome (the worker was killed,
    ran out of memory or timed out), and one more would only hold a worker up again.
    """
    now = now or utcnow()
    with session_factory.begin() as session:
        job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one_or_none()
        if job is None or job.state in FINISHED:
            return None
        if (job.state == JobState.running.value and job.heartbeat_at is not None
                and heartbeat_timeout_seconds is not None
                and job.heartbeat_at > now - timedelta(seconds=heartbeat_timeout_seconds)):
            log.info("job held by a live worker: this delivery stops",
                     extra={"job_id": job_id, "holder": job.worker, "attempt": job.attempts})
            return None
        if job.attempts >= max_attempts:
            reason = (f"gave up after {job.attempts} attempts that ended without a result (worker lost, out of "
                      f"memory or timed out); last: {job.error or 'no error recorded'}")
            job.state, job.error, job.finished_at = JobState.failed.value, reason, utcnow()
            session.execute(study_of(job).values(state=StudyState.failed.value, reason=reason,
                                                 reason_code="AttemptsExhausted"))
            log.warning("job failed: attempts exhausted", extra={"job_id": job_id, "attempts": job.attempts})
            return None
        # One statement that checks the version and moves the study: a late instance may reopen the
        # study (a new version, back to receiving) at any moment, and a check read before this write
        # would let it be overwritten with `processing` by a job whose result no longer applies,
        # leaving the study stuck there, never settled and never scored.
        moved = cast("CursorResult[Any]",
                     session.execute(study_of(job).values(state=StudyState.processing.value))).rowcount
        if not moved:
            job.state = JobState.superseded.value
            job.finished_at = utcnow()
            return None
        job.state = JobState.running.value
        job.attempts += 1
        job.started_at = job.heartbeat_at = now
        job.worker = worker
        session.flush()
        session.expunge(job)
    log.info("job claimed", extra={"job_id": job_id, "worker": worker, "attempt": job.attempts})
    return job


def beat_job(session_factory: sessionmaker[Session], job: Job, *, alive: bool = True) -> bool:
    """Renew the claim of ``job`` (this attempt of it, while running); ``alive=False`` lets it go
    (a transient error: the task's retry may take it over at once). False: the claim was lost."""
    with session_factory.begin() as session:
        return bool(cast("CursorResult[Any]", session.execute(
            update(Job).where(Job.id == job.id, Job.state == JobState.running.value, Job.attempts == job.attempts)
            .values(heartbeat_at=utcnow() if alive else None)
        )).rowcount)


def release_job(session_factory: sessionmaker[Session], job: Job, reason: str) -> None:
    """Hand a running job back to the outbox with the reason its attempt ended; the dispatcher
    queues it again and :func:`claim_job` counts the attempts."""
    with session_factory.begin() as session:
        session.execute(
            update(Job).where(Job.id == job.id, Job.state == JobState.running.value)
            .values(state=JobState.pending.value, error=reason)
        )


def finish_with_error(session_factory: sessionmaker[Session], job: Job, state: StudyState, reason: str,
                      reason_code: str) -> None:
    with session_factory.begin() as session:
        session.execute(
            update(Job).where(Job.id == job.id).values(state=JobState.failed.value if state is StudyState.failed
                                                       else JobState.done.value, error=reason, finished_at=utcnow())
        )
        session.execute(study_of(job).values(state=state.value, reason=reason, reason_code=reason_code))


def finish_scored(session: Session, job: Job, row: dict[str, Any], flags: list[dict[str, Any]], lower_bound: bool,
                  settings: Settings, now: datetime) -> None:
    """Write the result ``row`` (SCORE_COLUMNS, timings, details) and mark job and study scored.
    A lower-bound severity floors the band and the priority (``models.priority``); the flags go on
    the study row with the scores, replacing the previous scoring's. The comparison with the
    patient's prior study (``app.priors``) is written with them."""
    severity = row["severity"]
    priority = priority_score(severity, row["identification"], settings.severity_band_edges, lower_bound=lower_bound)
    band = effective_band(severity, lower_bound, settings.severity_band_edges)
    insert_ignore(session, Result, {**row, "study_id": job.study_id, "job_id": job.id,
                                    "study_version": job.study_version, "created_at": now}, "job_id")
    session.execute(
        update(Job).where(Job.id == job.id)
        .values(state=JobState.done.value, finished_at=now, timings=row["timings"], error=None)
    )
    session.execute(
        study_of(job).values(state=StudyState.scored.value, reason=None, reason_code=None, scored_at=now,
                             identification=row["identification"], severity=severity,
                             severity_left=row["severity_left"], severity_right=row["severity_right"],
                             severity_band=band, priority=priority, method=row["method"],
                             model_version=row["model_version"], chosen_series_uid=row["series_uid"], flags=flags,
                             severity_lower_bound=lower_bound)
    )
    compare_with_prior(session, job.study_id, settings)


# --- exports ----------------------------------------------------------------------------------


def add_exports(session: Session, job_id: int, now: datetime, hold_seconds: float = 0.0) -> int | None:
    """Pending rows for the result of ``job_id`` (kinds it already has are kept), due after
    ``hold_seconds``, in the caller's transaction: the scoring writes them with its result, so no
    result is ever left without its exports. Pending rows of the study's older results are
    superseded: the newest scoring is the one that counts, and an older one sent after it would
    only bury it. Returns the result id, None when the job has no result."""
    result = session.execute(select(Result).where(Result.job_id == job_id)).scalar_one_or_none()
    if result is None:
        return None
    session.execute(
        update(Export)
        .where(Export.study_id == result.study_id, Export.result_id < result.id,
               Export.state == ExportState.pending.value)
        .values(state=ExportState.superseded.value, next_attempt_at=None,
                last_error=f"superseded by result {result.id}, a newer scoring of the study; not sent")
        .execution_options(synchronize_session=False)
    )
    files = (result.details or {}).get("files") or {}
    kinds = [ExportKind.sr]
    if files.get("masks"):
        kinds.append(ExportKind.seg)
    if files.get("projection"):
        kinds.append(ExportKind.sc)
    existing = set(session.execute(select(Export.kind).where(Export.result_id == result.id)).scalars())
    for kind in kinds:
        if kind.value not in existing:
            session.add(Export(study_id=result.study_id, result_id=result.id, kind=kind.value,
                               sop_instance_uid=str(generate_uid()), state=ExportState.pending.value,
                               attempts=0, created_at=now,
                               next_attempt_at=now + timedelta(seconds=max(hold_seconds, 0.0))))
    return result.id


def reset_export(session_factory: sessionmaker[Session], export_id: int) -> Export | None:
    """An admin's retry: the export is pending again with a fresh set of attempts (its last
    error stays visible until an attempt succeeds). A superseded export stays so: a newer scoring
    of the study counts. None when there is no such export."""
    with session_factory.begin() as session:
        row = session.get(Export, export_id)
        if row is None:
            return None
        if row.state == ExportState.superseded.value:  # a newer scoring counts: never send an older one
            session.expunge(row)
            return row
        row.state = ExportState.pending.value
        row.attempts = 0
        row.next_attempt_at = utcnow()
        session.flush()
        session.expunge(row)
        return row


# --- retention ---------------------------------------------------------------------------------


def mark_files_purged(session: Session, study_id: int, cutoff: datetime, now: datetime) -> bool:
    """Retention's claim of a study before its files go: only if it is still finished and quiet
    since ``cutoff`` (a late instance reopens the study and keeps its files; a rescore since
    keeps them too). False: leave the files."""
    return bool(cast("CursorResult[Any]", session.execute(
        update(Study)
        .where(Study.id == study_id, Study.state.in_(PURGEABLE), Study.last_received_at <= cutoff,
               or_(Study.scored_at.is_(None), Study.scored_at <= cutoff))
        .values(files_purged_at=now, instance_count=0)
    )).rowcount)
