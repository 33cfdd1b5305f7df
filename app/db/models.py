"""Typed SQLAlchemy 2.0 models: studies, series, instances, jobs, results, exports, quarantined files.

The study row carries its current scores (denormalised from the newest result) so the worklist
is one indexed query; the ``results`` table keeps every scoring, rescores included.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class StudyState(enum.StrEnum):
    receiving = "receiving"
    queued = "queued"
    processing = "processing"
    scored = "scored"
    failed = "failed"
    rejected = "rejected"


class JobState(enum.StrEnum):
    pending = "pending"  # written, not yet handed to the broker (outbox)
    enqueued = "enqueued"
    running = "running"
    done = "done"
    failed = "failed"
    superseded = "superseded"  # a newer version of the study was queued


class JobTrigger(enum.StrEnum):
    """What queued a job: one of the two settle rules (``app.assembly``) or an admin's rescore."""

    settled = "settled"  # no instance arrived for settle_seconds
    released = "released"  # a complete series was delivered and its association released
    rescore = "rescore"  # asked for (always recomputes: worker.jobs)

    @property
    def description(self) -> str:
        return TRIGGER_DESCRIPTIONS[self]


#: How the study page and the admin API say why a job was queued.
TRIGGER_DESCRIPTIONS = {
    JobTrigger.settled: "no instance arrived for the settle time (CTTRIAGE_SETTLE_SECONDS)",
    JobTrigger.released: "a complete series was delivered and its association released "
                         "(CTTRIAGE_SETTLE_AFTER_RELEASE_SECONDS of quiet)",
    JobTrigger.rescore: "a rescore was asked for",
}


UID = String(64)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}

    if TYPE_CHECKING:
        # Every model here maps one Table (DeclarativeBase says FromClause, which also covers
        # classes mapped onto a join or a select): Core statements may use its columns and update it.
        __table__: ClassVar[Table]


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    accession_number: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(128))
    patient_age: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(4))
    #: Shown to radiologists on the pages only: never logged, counted or put in an error body.
    patient_name: Mapped[str | None] = mapped_column(String(128))
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    #: With patient_id, who the patient is (app.priors matches priors on both; never logged).
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64))
    #: DICOM DA (YYYYMMDD): a differing birth date blocks a prior match (app.priors).
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    state: Mapped[str] = mapped_column(String(16), default=StudyState.receiving.value)
    reason: Mapped[str | None] = mapped_column(Text)
    #: The error class behind ``reason`` (a bounded set: metrics group failures by it).
    reason_code: Mapped[str | None] = mapped_column(String(64))
    #: Bumped whenever new instances arrive after queueing, or a rescore is asked for.
    version: Mapped[int] = mapped_column(Integer, default=1)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: Set when an association that delivered a complete series was released
    #: (``app.assembly.mark_released``): the study settles then, not ``settle_seconds`` after the last
    #: instance. Any instance that arrives clears it.
    settle_due_at: Mapped[datetime | None]
    queued_at: Mapped[datetime | None]
    scored_at: Mapped[datetime | None]
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    chosen_series_uid: Mapped[str | None] = mapped_column(UID)
    # current scores (from the newest result)
    identification: Mapped[float | None] = mapped_column(Float)
    severity: Mapped[float | None] = mapped_column(Float)
    severity_left: Mapped[float | None] = mapped_column(Float)
    severity_right: Mapped[float | None] = mapped_column(Float)
    severity_band: Mapped[int | None] = mapped_column(Integer)
    priority: Mapped[float | None] = mapped_column(Float)
    method: Mapped[str | None] = mapped_column(String(32))
    model_version: Mapped[str | None] = mapped_column(String(64))
    #: The current scoring's quality flags ({code, message, lower_bound} each, models.findings):
    #: here so the worklist shows them without reading results; written with the scores.
    flags: Mapped[list[Any]] = mapped_column(JSON, default=list, server_default=text("'[]'"))
    #: The current severity is a lower bound: severity_band and priority are floored (app.priority).
    severity_lower_bound: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # the current scoring's comparison with the patient's prior study (app.priors; see Result)
    prior_study_uid: Mapped[str | None] = mapped_column(UID)
    prior_study_date: Mapped[str | None] = mapped_column(String(8))
    prior_days: Mapped[int | None] = mapped_column(Integer)
    severity_change: Mapped[float | None] = mapped_column(Float)
    prior_reason: Mapped[str | None] = mapped_column(Text)

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.series_number")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", order_by="Job.id")
    results: Mapped[list[Result]] = relationship(back_populates="study", order_by="Result.id")
    exports: Mapped[list[Export]] = relationship(back_populates="study", order_by="Export.id")

    #: Set when the received files were deleted after the retention period (rows stay).
    files_purged_at: Mapped[datetime | None]

    __table_args__ = (
        # The worklist order (app.api.routes_studies.worklist_order) as an index, so the first page
        # is an index scan at any size. SQLite already sorts NULLs last under DESC and cannot
        # say NULLS LAST in an index, hence one index per backend.
        Index("ix_studies_worklist_pg", priority.desc().nulls_last(), first_received_at, id).ddl_if(
            dialect="postgresql"),
        Index("ix_studies_worklist_sqlite", priority.desc(), first_received_at, id).ddl_if(dialect="sqlite"),
        Index("ix_studies_state_received", "state", "last_received_at"),
    )


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    description: Mapped[str | None] = mapped_column(String(128))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    chosen: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Why series selection passed this series over (None for the chosen one, or before selection).
    skip_reason: Mapped[str | None] = mapped_column(Text)
    slice_count: Mapped[int | None] = mapped_column(Integer)
    slice_spacing_mm: Mapped[float | None] = mapped_column(Float)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: How many times this SOP instance arrived (re-sends are idempotent).
    receive_count: Mapped[int] = mapped_column(Integer, default=1)
    source: Mapped[str] = mapped_column(String(16))  # "dicom" or "upload"
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    #: The process that received it ("host:pid", ``app.liveness.process_name``; None for uploads
    #: recorded before it existed): several listener processes share one port.
    received_by: Mapped[str | None] = mapped_column(String(64))
    #: One SliceHeader dict per frame (models.dicom_headers), read once at receipt.
    headers: Mapped[list[Any]] = mapped_column(JSON, default=list)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=JobState.pending.value)
    #: What queued it: a JobTrigger value.
    trigger: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    celery_task_id: Mapped[str | None] = mapped_column(String(64))
    worker: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    enqueued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    #: Written every few seconds by the worker holding the job while it runs: the claim is alive.
    heartbeat_at: Mapped[datetime | None]
    #: How many times the job was handed to the broker (a lost message is re-sent with backoff).
    sends: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    study: Mapped[Study] = relationship(back_populates="jobs")

    __table_args__ = (
        UniqueConstraint("study_id", "study_version", name="uq_jobs_study_version"),
        Index("ix_jobs_state", "state"),
    )


class Result(Base):
    __tablename__ = "results"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    #: One result per job: a redelivered task cannot write a second one.
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    study_version: Mapped[int] = mapped_column(Integer)
    series_uid: Mapped[str] = mapped_column(UID)
    method: Mapped[str] = mapped_column(String(32))
    model_version: Mapped[str] = mapped_column(String(64))
    identification: Mapped[float | None] = mapped_column(Float)
    severity: Mapped[float] = mapped_column(Float)
    severity_left: Mapped[float] = mapped_column(Float)
    severity_right: Mapped[float] = mapped_column(Float)
    lung_volume_left_ml: Mapped[float] = mapped_column(Float)
    lung_volume_right_ml: Mapped[float] = mapped_column(Float)
    lesion_volume_left_ml: Mapped[float] = mapped_column(Float)
    lesion_volume_right_ml: Mapped[float] = mapped_column(Float)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Comparison with the patient's prior study (app.priors): the prior's newest result, its study's
    # date, days between the study dates, and this minus the prior in points (severity) and mL.
    # Without a prior these stay None and prior_reason says why.
    prior_result_id: Mapped[int | None] = mapped_column(Integer)
    prior_study_uid: Mapped[str | None] = mapped_column(UID)
    prior_study_date: Mapped[str | None] = mapped_column(String(8))
    prior_days: Mapped[int | None] = mapped_column(Integer)
    severity_change: Mapped[float | None] = mapped_column(Float)
    severity_left_change: Mapped[float | None] = mapped_column(Float)
    severity_right_change: Mapped[float | None] = mapped_column(Float)
    lesion_volume_change_ml: Mapped[float | None] = mapped_column(Float)
    prior_reason: Mapped[str | None] = mapped_column(Text)

    study: Mapped[Study] = relationship(back_populates="results")


class PriorLookupState(enum.StrEnum):
    pending = "pending"  # to be looked up
    running = "running"  # querying the PACS or retrieving
    retrieved = "retrieved"  # the prior was sent here; it is scored like any study, after new ones
    none = "none"  # the PACS holds no earlier CT study of the patient in the period
    skipped = "skipped"  # not looked up (the daily limit, or the prior is already here)
    failed = "failed"  # the PACS could not be queried or did not send; the reason says why


class PriorLookup(Base):
    """A look for a study's prior on the PACS (``app.prior_lookups``): one per study at most."""

    __tablename__ = "prior_lookups"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), unique=True)
    state: Mapped[str] = mapped_column(String(16), default=PriorLookupState.pending.value)
    reason: Mapped[str | None] = mapped_column(Text)
    #: The prior found on the PACS; its scoring job is queued after new studies (app.priority).
    prior_study_uid: Mapped[str | None] = mapped_column(UID, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_prior_lookups_state", "state"),)


class ExportKind(enum.StrEnum):
    sr = "sr"  # Structured Report with the scores
    seg = "seg"  # Segmentation: right lung, left lung, lesions
    sc = "sc"  # Secondary Capture of the projection picture


class ExportState(enum.StrEnum):
    pending = "pending"  # to be sent (again)
    sent = "sent"
    failed = "failed"  # attempts exhausted or the object could not be built; an admin may retry
    superseded = "superseded"  # never sent: a newer scoring of the study came first (export hold)


class Export(Base):
    """One DICOM object sent back to the PACS for a result (SR, SEG or secondary capture), with
    every attempt's outcome. Its SOP instance UID is fixed when the row is made, so a retried
    send delivers the same instance."""

    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # ExportKind
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    state: Mapped[str] = mapped_column(String(16), default=ExportState.pending.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]
    #: When the next send is due while pending; the outbox relay hands overdue ones back to the
    #: broker (a task lost with the broker, or never queued because it was down).
    next_attempt_at: Mapped[datetime | None]

    study: Mapped[Study] = relationship(back_populates="exports")

    __table_args__ = (
        UniqueConstraint("result_id", "kind", name="uq_exports_result_kind"),
        Index("ix_exports_state", "state"),
    )


class Listener(Base):
    """A DICOM listener's liveness: since when it can receive, and its last heartbeat. Settling
    counts silence only from ``up_since`` of the listeners that are alive."""

    __tablename__ = "listeners"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    up_since: Mapped[datetime]
    heartbeat_at: Mapped[datetime]


class QuarantinedFile(Base):
    """Received bytes that could not be attached to any study, kept with the reason."""

    __tablename__ = "quarantined_files"

    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    original_name: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(16))
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """An API key: only its SHA-256 is stored; the key itself is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # "radiologist" or "admin"
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class AuditEvent(Base):
    """Who read or changed what: one row per study read, upload, rescore or key change."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(32))
    study_uid: Mapped[str | None] = mapped_column(UID, index=True)
    detail: Mapped[str | None] = mapped_column(Text)


class EventCount(Base):
    """Counters of events that leave no other row (refused connections, oversize instances), kept
    in the database so ``/metrics``, served by the API process, covers the listener process too."""

    __tablename__ = "event_counts"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    label: Mapped[str] = mapped_column(String(64), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
