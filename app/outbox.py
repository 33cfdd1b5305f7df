"""The outbox relay: hand what the database holds pending (jobs, exports) to the broker.

A job or an export is written pending in the same transaction as the change that calls for it
(:mod:`app.lifecycle`); these functions hand it over afterwards. If the broker is down it stays
pending and the next pass retries, so nothing written is ever forgotten; a repeated hand-over is
harmless (the claim of a job, the export's own attempts).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.broker import Enqueue, EnqueueExport
from app.db.models import Export, ExportState, Job, JobState, Result, Study, utcnow
from app.prior_lookups import retrieved_as_prior
from app.priority import queue_priority

log = logging.getLogger(__name__)


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


def hand_over_exports(session_factory: sessionmaker[Session], job_id: int, enqueue: EnqueueExport) -> None:
    """The hook after a scoring: hand the result's pending exports to the broker. Never raises:
    the scores and the export rows are written already, and rows left pending go to the broker
    again with the outbox relay (:func:`dispatch_overdue_exports`)."""
    try:
        with session_factory() as session:
            result_id = session.execute(select(Result.id).where(Result.job_id == job_id)).scalar_one_or_none()
        if result_id is not None:
            enqueue(result_id)
    except Exception:
        log.exception("could not queue the export of a result", extra={"job_id": job_id})
