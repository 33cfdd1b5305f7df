"""Running one scoring job against the database: claim, score, write the result once.

This is the body of the Celery task, kept free of Celery so it can be called directly.
Delivery is at-least-once (late acks), so every step tolerates being run again: a job already
done is skipped, a result is unique per job, and a job whose study moved on to a newer version
writes its result to history without touching the study's current scores.

A job whose chosen series holds exactly the instances the study's latest result was scored on
reuses that result (a copy for this version, nothing recomputed, nothing exported again): a
study reopened by an instance that changed nothing scores the same. An admin's rescore (trigger
"rescore") always recomputes: it is how a newly installed model or method is applied.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Instance, Job, JobState, JobTrigger, Result, Series, Study, StudyState, utcnow
from app.db.upsert import insert_ignore
from app.errors import REJECTED, reason_code, study_state
from app.ingest import CREATED_BY
from app.priors import compare_with_prior
from app.score_details import flags_of, lower_bound_of
from app.series_selection import SeriesCriteria, SeriesSelection, select_series
from app.settings import Settings
from models.dicom_headers import SliceHeader
from models.predictor import predictor_for
from models.priority import effective_band, priority_score
from models.severity import LungSeverity
from worker.derived import save_derived
from worker.exports import EnqueueExport, add_exports, queue_exports
from worker.pipeline import StudyScore, score_study

if TYPE_CHECKING:
    from models.inference import TriageNetworks

log = logging.getLogger(__name__)

FINISHED = (JobState.done.value, JobState.superseded.value, JobState.failed.value)
#: ``Result.details`` key: SHA-256 of the scored series' sorted SOP instance UIDs.
INSTANCES_SHA256 = "instances_sha256"
#: ``Result.details`` key of a reused result: the id of the result it copies.
REUSED_RESULT_ID = "reused_result_id"
#: The Result columns a scoring fills, besides its job, version, timings and details.
SCORE_COLUMNS = ("series_uid", "method", "model_version", "identification",
                 *LungSeverity.__dataclass_fields__)


@dataclass(frozen=True)
class JobOutcome:
    job_id: int
    status: str  # scored, reused, rejected, failed, skipped, retry
    reason: str | None = None


def study_of(job: Job) -> Any:
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
        moved = session.execute(study_of(job).values(state=StudyState.processing.value)).rowcount
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
        return bool(session.execute(
            update(Job).where(Job.id == job.id, Job.state == JobState.running.value, Job.attempts == job.attempts)
            .values(heartbeat_at=utcnow() if alive else None)
        ).rowcount)


class JobHeartbeat:
    """Beats on the job every ``interval`` seconds while it runs, in a daemon thread; it stops
    beating after ``max_seconds`` (the processing timeout), so a hung scoring is handed back."""

    def __init__(self, session_factory: sessionmaker[Session], job: Job, interval: float, max_seconds: float) -> None:
        self.session_factory, self.job, self.interval, self.max_seconds = session_factory, job, interval, max_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"job-{job.id}-heartbeat", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.wait(self.interval) and time.monotonic() < deadline:
            try:
                if not beat_job(self.session_factory, self.job):
                    log.warning("job claim lost (handed back while running)", extra={"job_id": self.job.id})
                    return
            except Exception as exc:  # database down: the next beat tries again
                log.warning("job heartbeat failed", extra={"job_id": self.job.id, "error": type(exc).__name__})

    def __enter__(self) -> JobHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)


def let_go(session_factory: sessionmaker[Session], job: Job) -> None:
    """Before a transient error's retry: clear the heartbeat so the retry takes the job over at
    once. If the database is still down the heartbeat just ages, and the retry or the assembler
    takes it over after the heartbeat timeout."""
    try:
        beat_job(session_factory, job, alive=False)
    except Exception:  # noqa: BLE001 - see above
        pass


def out_of_memory(exc: BaseException) -> bool:
    """The host's MemoryError or CUDA's out-of-memory error (torch is only loaded with networks);
    the GPU's cache is emptied, so the next attempt starts from what the worker really holds."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(exc, torch.OutOfMemoryError):
        return False
    torch.cuda.empty_cache()
    return True


def release_job(session_factory: sessionmaker[Session], job: Job, reason: str) -> None:
    """Hand a running job back to the outbox with the reason its attempt ended; the dispatcher
    queues it again and :func:`claim_job` counts the attempts."""
    with session_factory.begin() as session:
        session.execute(
            update(Job).where(Job.id == job.id, Job.state == JobState.running.value)
            .values(state=JobState.pending.value, error=reason)
        )


def study_slices(session_factory: sessionmaker[Session], study_id: int) -> tuple[list[SliceHeader], dict[str, Path]]:
    """The study's slice headers and files; our own objects sent back are left out (their series
    keep the reason ingest gave them, "created by cttriage (...)")."""
    with session_factory() as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.path, Instance.headers).where(Instance.study_id == study_id)
        ).all()
    slices = [SliceHeader.from_dict(h) for _, _, headers in rows for h in headers if not h.get(CREATED_BY)]
    return slices, {uid: Path(path) for uid, path, _ in rows}


def instances_sha256(slices: list[SliceHeader], series_uid: str) -> str:
    """What identifies the input of a scoring: the hash of the series' sorted SOP instance UIDs."""
    uids = sorted({s.sop_instance_uid for s in slices if s.series_uid == series_uid})
    return hashlib.sha256("\n".join(uids).encode()).hexdigest()


def record_selection(session_factory: sessionmaker[Session], job: Job, selection: SeriesSelection) -> None:
    """Every series' decision; a series without image slices (SR, for one) was never a candidate."""
    decided = [d.series_uid for d in selection.decisions]
    with session_factory.begin() as session:
        session.execute(update(Series).where(Series.study_id == job.study_id, Series.series_uid.not_in(decided))
                        .values(chosen=False, skip_reason="no image slices"))
        for decision in selection.decisions:
            session.execute(
                update(Series)
                .where(Series.series_uid == decision.series_uid, Series.study_id == job.study_id)
                .values(chosen=decision.chosen, skip_reason=decision.reason, slice_count=decision.slice_count,
                        slice_spacing_mm=decision.slice_spacing_mm)
            )
        session.execute(study_of(job).values(chosen_series_uid=selection.chosen))


def finish_with_error(session_factory: sessionmaker[Session], job: Job, state: StudyState, reason: str,
                      reason_code: str) -> None:
    with session_factory.begin() as session:
        session.execute(
            update(Job).where(Job.id == job.id).values(state=JobState.failed.value if state is StudyState.failed
                                                       else JobState.done.value, error=reason, finished_at=utcnow())
        )
        session.execute(study_of(job).values(state=state.value, reason=reason, reason_code=reason_code))


def write_result(session_factory: sessionmaker[Session], job: Job, score: StudyScore, settings: Settings) -> None:
    """The result row, and the study's current scores when the job is still its current version;
    its exports are added with it."""
    sev = score.severity
    row = {"series_uid": score.series_uid, "method": score.method, "model_version": score.model_version,
           "identification": score.identification, **sev.to_dict(),
           "timings": score.timings, "details": score.details}
    now = utcnow()
    with session_factory.begin() as session:
        finish_scored(session, job, row, [f.to_dict() for f in score.flags], score.severity_lower_bound, settings,
                      now)
        if settings.export_enabled:  # with the result, or a worker lost in between would leave it unsent
            add_exports(session, job.id, now, settings.export_hold_seconds)


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


def reusable_result(session_factory: sessionmaker[Session], job: Job, slices: list[SliceHeader],
                    criteria: SeriesCriteria) -> tuple[Result, SeriesSelection] | None:
    """The study's latest result when this job would score exactly its instances again; None
    otherwise, and always for an admin's rescore."""
    if job.trigger == JobTrigger.rescore.value:
        return None
    with session_factory() as session:
        latest = session.execute(
            select(Result).where(Result.study_id == job.study_id).order_by(Result.id.desc()).limit(1)
        ).scalar_one_or_none()
    if latest is None or not (latest.details or {}).get(INSTANCES_SHA256):
        return None
    selection = select_series(slices, criteria)
    if selection.chosen != latest.series_uid:
        return None
    if instances_sha256(slices, selection.chosen) != latest.details[INSTANCES_SHA256]:
        return None
    return latest, selection


def reuse_result(session_factory: sessionmaker[Session], job: Job, previous: Result, selection: SeriesSelection,
                 settings: Settings) -> None:
    """Finish the job with a copy of ``previous`` for its version; no exports (the PACS has them)."""
    record_selection(session_factory, job, selection)
    row = {name: getattr(previous, name) for name in SCORE_COLUMNS}
    details = {**(previous.details or {}), REUSED_RESULT_ID: previous.id}
    row.update(timings={}, details=details)
    with session_factory.begin() as session:
        finish_scored(session, job, row, flags_of(details), lower_bound_of(details), settings, utcnow())


def with_derived_files(score: StudyScore, session_factory: sessionmaker[Session], job: Job,
                       settings: Settings) -> StudyScore:
    """Save masks and pictures; a failure here costs the pictures, never the scores."""
    if score.masks is None:
        return score
    with session_factory() as session:
        study_uid = session.execute(select(Study.study_uid).where(Study.id == job.study_id)).scalar_one()
    try:
        files = save_derived(settings.storage_root, study_uid, job.id, score.masks)
    except Exception:
        log.exception("could not save masks and pictures", extra={"job_id": job.id})
        return score
    return replace(score, details={**score.details, "files": files})


def run_job(job_id: int, session_factory: sessionmaker[Session], settings: Settings,
            worker: str | None = None, networks: Callable[[], TriageNetworks | None] | None = None,
            export: EnqueueExport | None = None) -> JobOutcome:
    """Score the study of ``job_id``. Database errors propagate (the task retries them).

    ``networks`` gives the worker process's loaded networks (None: threshold method); it is
    called inside the job, so unusable configured weights fail the job with their reason.
    ``export`` hands a result to the export queue (results back to the PACS, when enabled).
    """
    job = claim_job(session_factory, job_id, worker or socket.gethostname(), max_attempts=settings.job_max_attempts,
                    heartbeat_timeout_seconds=settings.job_heartbeat_timeout_seconds)
    if job is None:
        return JobOutcome(job_id, "skipped")
    try:
        with JobHeartbeat(session_factory, job, settings.job_heartbeat_interval_seconds,
                          settings.processing_timeout_seconds):
            return _run_claimed(job, session_factory, settings, networks, export)
    except DBAPIError:
        let_go(session_factory, job)
        raise


def _run_claimed(job: Job, session_factory: sessionmaker[Session], settings: Settings,
                 networks: Callable[[], TriageNetworks | None] | None, export: EnqueueExport | None) -> JobOutcome:
    """The body of :func:`run_job` once the job is claimed (its heartbeat runs meanwhile)."""
    job_id = job.id
    try:
        slices, paths = study_slices(session_factory, job.study_id)
        criteria = SeriesCriteria.from_settings(settings)
        reusable = reusable_result(session_factory, job, slices, criteria)
        if reusable is not None:
            reuse_result(session_factory, job, *reusable, settings)
            log.info("same instances as the latest result: reused", extra={"job_id": job_id})
            return JobOutcome(job_id, "reused")
        predictor = predictor_for(networks() if networks is not None else None, settings.inplane_spacing_mm)
        score = score_study(slices, paths, predictor, criteria=criteria,
                            on_selection=lambda selection: record_selection(session_factory, job, selection))
    except DBAPIError:
        raise  # transient: the task retries, the study stays processing
    except Exception as exc:
        if study_state(exc) == REJECTED:  # the images cannot be scored: no retry (app.errors' table)
            log.info("study rejected", extra={"job_id": job_id, "reason_type": reason_code(exc)})
            finish_with_error(session_factory, job, StudyState.rejected, str(exc), reason_code(exc))
            return JobOutcome(job_id, "rejected", str(exc))
        if out_of_memory(exc):  # maybe only this worker's moment: try again, up to job_max_attempts
            reason = "out of memory while scoring" + (" (GPU)" if not isinstance(exc, MemoryError) else "")
            log.warning("scoring ran out of memory", extra={"job_id": job_id, "attempt": job.attempts})
            release_job(session_factory, job, reason)
            return JobOutcome(job_id, "retry", reason)
        # A bug or an input we did not foresee: fail visibly, keep the data.
        reason = f"scoring failed: {type(exc).__name__}: {exc}"
        log.exception("scoring failed", extra={"job_id": job_id})
        finish_with_error(session_factory, job, StudyState.failed, reason, reason_code(exc))
        return JobOutcome(job_id, "failed", reason)
    score = with_derived_files(score, session_factory, job, settings)
    score = replace(score, details={**score.details, INSTANCES_SHA256: instances_sha256(slices, score.series_uid)})
    write_result(session_factory, job, score, settings)
    if settings.export_enabled and export is not None:
        queue_exports(session_factory, job.id, export)  # never raises
    log.info("study scored", extra={"job_id": job_id, "severity": round(score.severity.severity, 2),
                                    "seconds": score.timings.get("total")})
    return JobOutcome(job_id, "scored")
