"""Response models of the admin API (app.api.routes_admin) and of the browser pages' helpers."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from app.api.schemas import Orm


class Me(BaseModel):
    name: str
    role: str


class Percentiles(BaseModel):
    count: int
    p50: float | None
    p95: float | None


class Throughput(BaseModel):
    scored: int
    rejected: int
    failed: int
    scored_per_hour: float
    #: Last instance received → scored (arrivals only, not rescores an admin asked for).
    latency_seconds: Percentiles
    queue_wait_seconds: Percentiles
    processing_seconds: Percentiles


class QueueStatus(BaseModel):
    depth: int
    pending: int
    enqueued: int
    running: int


class WorkerActivity(BaseModel):
    name: str
    jobs_finished: int
    running: int
    last_finished_at: datetime | None


class CeleryPing(BaseModel):
    checked: bool
    responding: list[str] = []
    note: str | None = None


class StorageUsage(BaseModel):
    instances_bytes: int
    quarantine_bytes: int
    derived_bytes: int
    total_bytes: int
    disk_free_bytes: int | None
    disk_total_bytes: int | None


class Overview(BaseModel):
    generated_at: datetime
    studies_by_state: dict[str, int]
    queue: QueueStatus
    workers: list[WorkerActivity]
    celery: CeleryPing
    throughput: dict[str, Throughput]
    storage: StorageUsage


class LastJob(Orm):
    id: int
    state: str
    trigger: str
    attempts: int
    error: str | None
    worker: str | None
    finished_at: datetime | None


class FailureOut(BaseModel):
    study_uid: str
    accession_number: str | None
    state: str
    reason: str | None
    reason_code: str | None
    version: int
    first_received_at: datetime
    last_received_at: datetime
    last_job: LastJob | None


class Failures(BaseModel):
    items: list[FailureOut]
    total: int
    limit: int
    offset: int


class AuditEventOut(Orm):
    id: int
    at: datetime
    actor: str
    role: str
    action: str
    study_uid: str | None
    detail: str | None


class AuditLog(BaseModel):
    items: list[AuditEventOut]
    total: int
    limit: int
    offset: int


class PriorLookupOut(Orm):
    """A look for a study's prior on the PACS (app.prior_lookups), with its outcome."""

    id: int
    study_uid: str
    accession_number: str | None
    state: str
    reason: str | None
    prior_study_uid: str | None
    created_at: datetime
    finished_at: datetime | None


class PriorLookups(BaseModel):
    enabled: bool
    items: list[PriorLookupOut]
