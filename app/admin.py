"""What the admin sees: state counts, queue, workers, throughput and latency, storage, failures,
and the audit export of every score. Read from the database (the one place every process
writes to), so it is right whether the listener, API and workers share a process or not.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Instance, Job, JobState, JobTrigger, QuarantinedFile, Result, Study, StudyState, utcnow
from app.score_details import DESCRIPTOR_COLUMNS, descriptor_columns, flags_of, lower_bound_of
from app.worklist import worklist_query
from models.priority import effective_band

WINDOWS = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
NOT_SCORED = (StudyState.failed.value, StudyState.rejected.value)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Sequence[float]) -> dict[str, Any]:
    return {"count": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95)}


# --- overview --------------------------------------------------------------------------------


def studies_by_state(session: Session) -> dict[str, int]:
    counts = dict(session.execute(select(Study.state, func.count()).group_by(Study.state)).all())
    return {state.value: int(counts.get(state.value, 0)) for state in StudyState}


def queue_status(session: Session) -> dict[str, int]:
    counts = dict(session.execute(
        select(Job.state, func.count())
        .where(Job.state.in_([JobState.pending.value, JobState.enqueued.value, JobState.running.value]))
        .group_by(Job.state)).all())
    pending, enqueued = int(counts.get(JobState.pending.value, 0)), int(counts.get(JobState.enqueued.value, 0))
    return {"depth": pending + enqueued, "pending": pending, "enqueued": enqueued,
            "running": int(counts.get(JobState.running.value, 0))}


def worker_activity(session: Session, now: datetime, window: timedelta = WINDOWS["hour"]) -> list[dict[str, Any]]:
    """Workers named by jobs that finished in the window or are running now, busiest first."""
    since = now - window
    rows = session.execute(
        select(Job.worker, Job.state, Job.finished_at)
        .where(Job.worker.is_not(None),
               (Job.finished_at >= since) | (Job.state == JobState.running.value))
    ).all()
    workers: dict[str, dict[str, Any]] = {}
    for name, state, finished_at in rows:
        if name is None:  # never: the query leaves jobs without a worker out
            continue
        entry = workers.setdefault(name, {"name": name, "jobs_finished": 0, "running": 0, "last_finished_at": None})
        if state == JobState.running.value:
            entry["running"] += 1
        elif finished_at is not None:
            entry["jobs_finished"] += 1
            if entry["last_finished_at"] is None or finished_at > entry["last_finished_at"]:
                entry["last_finished_at"] = finished_at
    return sorted(workers.values(), key=lambda w: (-w["jobs_finished"], w["name"]))


def throughput(session: Session, now: datetime, window: timedelta) -> dict[str, Any]:
    """Scorings, rejections and failures finished in the window, and how long they took.

    ``latency_seconds``: last instance received → scored, for scorings of newly arrived images
    (a rescore an admin asked for is not an arrival); ``queue_wait_seconds``: handed to the
    broker → picked up by a worker; ``processing_seconds``: picked up → finished.
    """
    since = now - window
    scored = session.execute(
        select(Result.created_at, Study.last_received_at, Job.trigger, Job.enqueued_at, Job.started_at,
               Job.finished_at)
        .join(Study, Study.id == Result.study_id)
        .join(Job, Job.id == Result.job_id)
        .where(Result.created_at >= since)
    ).all()
    ended = dict(session.execute(
        select(Job.state, func.count())
        .where(Job.finished_at >= since, Job.error.is_not(None),
               Job.state.in_([JobState.failed.value, JobState.done.value]))
        .group_by(Job.state)).all())
    latency = [(r.created_at - r.last_received_at).total_seconds() for r in scored
               if r.trigger != JobTrigger.rescore.value and r.last_received_at <= r.created_at]
    waits = [(r.started_at - r.enqueued_at).total_seconds() for r in scored if r.started_at and r.enqueued_at]
    processing = [(r.finished_at - r.started_at).total_seconds() for r in scored if r.finished_at and r.started_at]
    hours = window.total_seconds() / 3600.0
    return {
        "scored": len(scored),
        "rejected": int(ended.get(JobState.done.value, 0)),  # a rejection ends its job "done" with the reason
        "failed": int(ended.get(JobState.failed.value, 0)),
        "scored_per_hour": len(scored) / hours,
        "latency_seconds": summary(latency),
        "queue_wait_seconds": summary(waits),
        "processing_seconds": summary(processing),
    }


def directory_bytes(root: Path) -> int:
    """Apparent size of the files under ``root`` (0 when it does not exist)."""
    total = 0
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


@dataclass
class TimedValue:
    """A value computed again only after ``ttl`` seconds or when ``token`` changes (walking a
    big folder is not free; a token such as the newest result id says it surely changed)."""

    compute: Callable[[], Any]
    ttl: float
    _value: Any = None
    _at: float = float("-inf")
    _token: Any = None

    def get(self, token: Any = None) -> Any:
        if time.monotonic() - self._at >= self.ttl or token != self._token:
            self._value, self._at, self._token = self.compute(), time.monotonic(), token
        return self._value


def derived_version(session: Session) -> Any:
    """Changes whenever a scoring wrote new derived files (masks and pictures)."""
    return session.execute(select(func.max(Result.id))).scalar_one()


def storage_usage(session: Session, storage_root: Path, derived_bytes: int) -> dict[str, Any]:
    """Bytes kept: received instances (files not purged yet, from the database), quarantined
    files, and the derived masks and pictures (a walk of ``_derived``, cached by the caller)."""
    instances = session.execute(
        select(func.coalesce(func.sum(Instance.size_bytes), 0))
        .join(Study, Study.id == Instance.study_id)
        .where(Study.files_purged_at.is_(None))
    ).scalar_one()
    quarantined = session.execute(select(func.coalesce(func.sum(QuarantinedFile.size_bytes), 0))).scalar_one()
    usage: dict[str, Any] = {"instances_bytes": int(instances), "quarantine_bytes": int(quarantined),
                             "derived_bytes": derived_bytes}
    usage["total_bytes"] = sum(usage.values())
    try:
        disk = os.statvfs(storage_root)
        usage["disk_free_bytes"] = disk.f_bavail * disk.f_frsize
        usage["disk_total_bytes"] = disk.f_blocks * disk.f_frsize
    except OSError:
        usage["disk_free_bytes"] = usage["disk_total_bytes"] = None
    return usage


def overview(session: Session, storage_root: Path, derived_bytes: int, now: datetime | None = None) -> dict[str, Any]:
    now = now or utcnow()
    return {
        "generated_at": now,
        "studies_by_state": studies_by_state(session),
        "queue": queue_status(session),
        "workers": worker_activity(session, now),
        "throughput": {name: throughput(session, now, window) for name, window in WINDOWS.items()},
        "storage": storage_usage(session, storage_root, derived_bytes),
    }


# --- failures --------------------------------------------------------------------------------


def failures(session: Session, limit: int, offset: int) -> tuple[int, list[dict[str, Any]]]:
    """Failed and rejected studies, most recently received first, each with its last job."""
    where = Study.state.in_(NOT_SCORED)
    total = session.execute(select(func.count()).select_from(Study).where(where)).scalar_one()
    studies = session.execute(
        select(Study).where(where).order_by(Study.last_received_at.desc(), Study.id.desc()).limit(limit).offset(offset)
    ).scalars().all()
    last_jobs: dict[int, Job] = {}
    if studies:
        for job in session.execute(
            select(Job).where(Job.study_id.in_([s.id for s in studies])).order_by(Job.id)
        ).scalars():
            last_jobs[job.study_id] = job
    return int(total), [{"study": s, "last_job": last_jobs.get(s.id)} for s in studies]


# --- export of every score, for audit ----------------------------------------------------------

#: Each scoring against the patient's prior study (app.priors), as the result stores it.
PRIOR_COLUMNS = ("prior_study_uid", "prior_study_date", "prior_days", "severity_change", "severity_left_change",
                 "severity_right_change", "lesion_volume_change_ml", "prior_reason")
EXPORT_COLUMNS = (
    "study_uid", "accession_number", "study_date", "state", "reason_code", "first_received_at",
    "last_received_at", "result_id", "study_version", "trigger", "scored_at", "latest", "method",
    "model_version", "series_uid", "identification", "severity", "severity_left", "severity_right",
    "severity_band", "severity_lower_bound", "flags", *DESCRIPTOR_COLUMNS, *PRIOR_COLUMNS,
)


def export_query(states: Sequence[str] | None, received_from: date | None, received_to: date | None,
                 bands: Sequence[int] | None = None, zone: tzinfo = UTC) -> Select[Any]:
    """One row per scoring (every rescore kept; ``latest`` marks the study's newest), and one row
    for a study never scored; the study filters are the worklist's."""
    newest = select(Result.study_id, func.max(Result.id).label("newest_id")).group_by(Result.study_id).subquery()
    return (
        worklist_query(states, received_from, received_to, bands, zone)
        .with_only_columns(
            Study.study_uid, Study.accession_number, Study.study_date, Study.state, Study.reason_code,
            Study.first_received_at, Study.last_received_at, newest.c.newest_id,
            Result.id.label("result_id"), Result.study_version, Job.trigger, Result.created_at.label("scored_at"),
            Result.method, Result.model_version, Result.series_uid, Result.identification, Result.severity,
            Result.severity_left, Result.severity_right, Result.details,
            *(getattr(Result, column) for column in PRIOR_COLUMNS),
        )
        .outerjoin(Result, Result.study_id == Study.id)
        .outerjoin(Job, Job.id == Result.job_id)
        .outerjoin(newest, newest.c.study_id == Study.id)
        .order_by(Study.id, Result.id)
    )


def export_rows(session_factory: sessionmaker[Session], query: Select[Any],
                band_edges: Sequence[float]) -> Iterator[dict[str, Any]]:
    """Rows of ``query`` as export records, streamed from the database in batches."""
    with session_factory() as session:
        for row in session.execute(query.execution_options(yield_per=500)):
            record = {column: getattr(row, column, None) for column in EXPORT_COLUMNS}
            scored = row.result_id is not None
            record["latest"] = row.result_id == row.newest_id if scored else None
            if scored:  # the result's own flags and band (a rescore's may differ from the study's now)
                lower_bound = lower_bound_of(row.details)
                record["severity_band"] = effective_band(row.severity, lower_bound, band_edges)
                record["severity_lower_bound"] = lower_bound
                record["flags"] = [f["code"] for f in flags_of(row.details)]
                record.update(descriptor_columns(row.details))
            yield record


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):  # flag codes: one cell, ";"-separated
        return ";".join(_text(v) for v in value)
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


#: A spreadsheet runs a cell starting with one of these as a formula (CSV injection); DICOM text
#: (accession numbers) comes from outside, so such cells get a leading apostrophe.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> str:
    text = _text(value)
    if isinstance(value, str) and text.startswith(FORMULA_STARTS):
        return "'" + text
    return text


def csv_chunks(records: Iterator[dict[str, Any]], batch: int = 200) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_COLUMNS)
    for i, record in enumerate(records, 1):
        writer.writerow([_csv_cell(record[c]) for c in EXPORT_COLUMNS])
        if i % batch == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()


def json_chunks(records: Iterator[dict[str, Any]], batch: int = 200) -> Iterator[str]:
    """A JSON array, written as it is read."""
    parts = ["["]
    for i, record in enumerate(records):
        parts.append(("," if i else "") + "\n" + json.dumps(record, default=_text))
        if len(parts) >= batch:
            yield "".join(parts)
            parts = []
    parts.append("\n]\n")
    yield "".join(parts)
