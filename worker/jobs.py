"""Running one scoring job against the database: claim, select, record, load, predict, save, finish.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from app.broker import EnqueueExport
from app.db.models import Instance, Job, JobState, JobTrigger, Result, Series, Study, StudyState, utcnow
from app.errors import REJECTED, reason_code, study_state
from app.ingest import CREATED_BY
from app.lifecycle import (
    add_exports,
    beat_job,
    claim_job,
    finish_scored,
    finish_with_error,
    release_job,
    study_of,
)
from app.outbox import hand_over_exports
from app.score_details import flags_of, lower_bound_of
from app.series_selection import SeriesCriteria, SeriesSelection, select_series
from app.settings import Settings
from models.dicom_headers import SliceHeader
from models.predictor import predictor_for
from models.severity import LungSeverity
from models.timing import StepTimer
from worker.derived import save_derived
from worker.pipeline import StudyScore, load_series, score_volume

if TYPE_CHECKING:
    from models.inference import TriageNetworks
    from models.predictor import Predictor
    from models.volume import CtVolume

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
    except Exception:
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


def reusable_result(session_factory: sessionmaker[Session], job: Job, slices: list[SliceHeader],
                    selection: SeriesSelection) -> Result | None:
    """The study's latest result when this job would score exactly its instances again; None
    otherwise, and always for an admin's rescore."""
    if job.trigger == JobTrigger.rescore.value or selection.chosen is None:
        return None
    with session_factory() as session:
        latest = session.execute(
            select(Result).where(Result.study_id == job.study_id).order_by(Result.id.desc()).limit(1)
        ).scalar_one_or_none()
    if latest is None or not (latest.details or {}).get(INSTANCES_SHA256):
        return None
    if selection.chosen != latest.series_uid:
        return None
    if instances_sha256(slices, selection.chosen) != latest.details[INSTANCES_SHA256]:
        return None
    return latest


def reuse_result(session_factory: sessionmaker[Session], job: Job, previous: Result, settings: Settings) -> JobOutcome:
    """Finish the job with a copy of ``previous`` for its version; no exports (the PACS has them)."""
    row = {name: getattr(previous, name) for name in SCORE_COLUMNS}
    details = {**(previous.details or {}), REUSED_RESULT_ID: previous.id}
    row.update(timings={}, details=details)
    with session_factory.begin() as session:
        finish_scored(session, job, row, flags_of(details), lower_bound_of(details), settings, utcnow())
    log.info("same instances as the latest result: reused", extra={"job_id": job.id})
    return JobOutcome(job.id, "reused")


def save_files(score: StudyScore, session_factory: sessionmaker[Session], job: Job, settings: Settings) -> StudyScore:
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


def finish(session_factory: sessionmaker[Session], job: Job, score: StudyScore, slices: list[SliceHeader],
           settings: Settings, export: EnqueueExport | None) -> JobOutcome:
    """Write the result (its input's hash with it) and hand its exports to the broker."""
    score = replace(score, details={**score.details, INSTANCES_SHA256: instances_sha256(slices, score.series_uid)})
    write_result(session_factory, job, score, settings)
    if settings.export_enabled and export is not None:
        hand_over_exports(session_factory, job.id, export)  # never raises
    log.info("study scored", extra={"job_id": job.id, "severity": round(score.severity.severity, 2),
                                    "seconds": score.timings.get("total")})
    return JobOutcome(job.id, "scored")


def fail(session_factory: sessionmaker[Session], job: Job, exc: Exception) -> JobOutcome:
    """The outcome of an error while scoring: rejected (the images, by app.errors' table), handed
    back (out of memory), or failed (anything else: visibly, the data kept)."""
    if study_state(exc) == REJECTED:  # the images cannot be scored: no retry
        log.info("study rejected", extra={"job_id": job.id, "reason_type": reason_code(exc)})
        finish_with_error(session_factory, job, StudyState.rejected, str(exc), reason_code(exc))
        return JobOutcome(job.id, "rejected", str(exc))
    if out_of_memory(exc):  # maybe only this worker's moment: try again, up to job_max_attempts
        reason = "out of memory while scoring" + (" (GPU)" if not isinstance(exc, MemoryError) else "")
        log.warning("scoring ran out of memory", extra={"job_id": job.id, "attempt": job.attempts})
        release_job(session_factory, job, reason)
        return JobOutcome(job.id, "retry", reason)
    reason = f"scoring failed: {type(exc).__name__}: {exc}"
    log.exception("scoring failed", extra={"job_id": job.id})
    finish_with_error(session_factory, job, StudyState.failed, reason, reason_code(exc))
    return JobOutcome(job.id, "failed", reason)


def configured_predictor(networks: Callable[[], TriageNetworks | None] | None, settings: Settings) -> Predictor:
    """The configured method; the networks are asked for inside the job, so unusable configured
    weights (or no memory for them) end the job with their reason before any series is loaded."""
    return predictor_for(networks() if networks is not None else None, settings.inplane_spacing_mm)


def predict(series_uid: str, volume: CtVolume, predictor: Predictor, criteria: SeriesCriteria,
            timer: StepTimer) -> StudyScore:
    """Score the loaded series; ``timer`` holds the steps before (select, load)."""
    return score_volume(series_uid, volume, predictor, criteria=criteria, timer=timer)


@contextmanager
def held(session_factory: sessionmaker[Session], job: Job, settings: Settings) -> Iterator[None]:
    """While the job runs its claim is renewed (:class:`JobHeartbeat`); a database error lets it
    go, so the task's retry takes it over at once, and propagates."""
    try:
        with JobHeartbeat(session_factory, job, settings.job_heartbeat_interval_seconds,
                          settings.processing_timeout_seconds):
            yield
    except DBAPIError:
        let_go(session_factory, job)
        raise


def run_job(job_id: int, session_factory: sessionmaker[Session], settings: Settings,
            worker: str | None = None, networks: Callable[[], TriageNetworks | None] | None = None,
            export: EnqueueExport | None = None) -> JobOutcome:
    """Score the study of ``job_id``: claim, select, record, load, predict, save, finish.
    Database errors propagate (the task retries them); any other error while scoring ends the job
    by :func:`fail`.

    ``networks`` gives the worker process's loaded networks (None: threshold method).
    ``export`` hands a result to the export queue (results back to the PACS, when enabled).
    """
    job = claim_job(session_factory, job_id, worker or socket.gethostname(), max_attempts=settings.job_max_attempts,
                    heartbeat_timeout_seconds=settings.job_heartbeat_timeout_seconds)
    if job is None:
        return JobOutcome(job_id, "skipped")
    criteria, timer = SeriesCriteria.from_settings(settings), StepTimer()
    with held(session_factory, job, settings):
        try:
            slices, paths = study_slices(session_factory, job.study_id)
            with timer.step("select"):
                selection = select_series(slices, criteria)
            record_selection(session_factory, job, selection)  # before a rejection too: each series' reason
            previous = reusable_result(session_factory, job, slices, selection)
            if previous is not None:
                return reuse_result(session_factory, job, previous, settings)
            predictor = configured_predictor(networks, settings)
            chosen = selection.require()
            with timer.step("load"):
                volume = load_series(chosen, slices, paths)
            score = predict(chosen, volume, predictor, criteria, timer)
        except DBAPIError:
            raise  # transient: the task retries, the study stays processing
        except Exception as exc:
            return fail(session_factory, job, exc)
        score = save_files(score, session_factory, job, settings)
        return finish(session_factory, job, score, slices, settings, export)
