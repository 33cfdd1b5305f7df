"""Admin API: overview (states, queue, workers, throughput, latency, storage), failures and
their retry, the audit export of every score (CSV or JSON, streamed) and the audit log."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import StreamingResponse
from pydantic import Field
from sqlalchemy import func, select

from app import admin
from app.api.auth import Admin
from app.api.deps import BrokerDep, DayZoneDep, Offset, SessionDep, SessionFactoryDep, SettingsDep
from app.api.rescoring import rescore
from app.api.schemas import RescoreAccepted
from app.api.schemas_admin import (
    AuditEventOut,
    AuditLog,
    CeleryPing,
    FailureOut,
    Failures,
    LastJob,
    Overview,
    PriorLookupOut,
    PriorLookups,
)
from app.broker import Broker
from app.db.models import AuditEvent, PriorLookup, Study, StudyState
from app.dicom.storage import DERIVED_DIR
from app.security import record_audit
from app.settings import Settings

router = APIRouter(prefix="/api/admin", tags=["admin"])

#: The walk of the derived files and the broadcast ping are cached this long (seconds), so an
#: admin page that refreshes often costs little.
STORAGE_WALK_TTL = 60.0
PING_TTL = 10.0
PING_TIMEOUT = 1.0


def _cached(request: Request, name: str, ttl: float, compute: Any, token: Any = None) -> Any:
    state = request.app.state
    if not hasattr(state, "admin_cache"):
        state.admin_cache = {}
    cache: dict[str, admin.TimedValue] = state.admin_cache
    if name not in cache:
        cache[name] = admin.TimedValue(compute, ttl)
    return cache[name].get(token)


def _celery_ping(broker: Broker | None, settings: Settings) -> CeleryPing:
    """Workers answering a broadcast ping through the broker (Redis in production)."""
    if settings.embedded_broker:
        return CeleryPing(checked=False, note="the embedded SQLite broker has no broadcast; see workers (from jobs)")
    if broker is None:
        return CeleryPing(checked=False, note="no broker given to this API")
    try:
        responding = broker.responding_workers(PING_TIMEOUT)
    except Exception as exc:  # broker unreachable: say so, the rest of the overview still stands
        return CeleryPing(checked=False, note=f"broker unreachable: {type(exc).__name__}")
    return CeleryPing(checked=True, responding=responding)


@router.get("/overview", response_model=Overview)
def get_overview(request: Request, session: SessionDep, settings: SettingsDep, broker: BrokerDep,
                 _principal: Admin) -> Overview:
    derived = _cached(request, "derived_bytes", STORAGE_WALK_TTL,
                      lambda: admin.directory_bytes(settings.storage_root / DERIVED_DIR),
                      token=admin.derived_version(session))
    celery = _cached(request, "celery_ping", PING_TTL, lambda: _celery_ping(broker, settings))
    return Overview(**admin.overview(session, settings.storage_root, derived), celery=celery)


@router.get("/failures", response_model=Failures)
def get_failures(
    session: SessionDep,
    _principal: Admin,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Offset = 0,
) -> Failures:
    """Failed and rejected studies, most recently received first, with reason and last job error."""
    total, rows = admin.failures(session, limit, offset)
    items = [
        FailureOut(study_uid=r["study"].study_uid, accession_number=r["study"].accession_number,
                   state=r["study"].state, reason=r["study"].reason, reason_code=r["study"].reason_code,
                   version=r["study"].version, first_received_at=r["study"].first_received_at,
                   last_received_at=r["study"].last_received_at,
                   last_job=LastJob.model_validate(r["last_job"]) if r["last_job"] else None)
        for r in rows
    ]
    return Failures(items=items, total=total, limit=limit, offset=offset)


@router.post("/studies/{study_uid:path}/retry", response_model=RescoreAccepted, status_code=status.HTTP_202_ACCEPTED)
def retry_study(study_uid: str, factory: SessionFactoryDep, broker: BrokerDep, principal: Admin) -> RescoreAccepted:
    """Score the study again (a new version, audited): the same as ``POST /api/studies/{uid}/rescore``."""
    return rescore(factory, broker, study_uid, principal)


@router.get("/export.{fmt}", response_class=StreamingResponse,
            responses={200: {"content": {"text/csv": {}, "application/json": {}}}})
def export_scores(
    fmt: Literal["csv", "json"],
    factory: SessionFactoryDep,
    settings: SettingsDep,
    principal: Admin,
    zone: DayZoneDep,
    state: Annotated[list[StudyState] | None, Query(description="Only studies in these states.")] = None,
    received_from: Annotated[date | None, Query(description="First received on or after this day (in tz).")] = None,
    received_to: Annotated[date | None, Query(description="First received on or before this day (in tz).")] = None,
    band: Annotated[list[Annotated[int, Field(ge=0, le=4)]] | None, Query()] = None,
) -> StreamingResponse:
    """Every scoring of every study (rescores included, ``latest`` marks the newest), and studies
    never scored with their state: for audit. Streamed as it is read."""
    with factory.begin() as session:
        record_audit(session, principal, "export", None, f"scores as {fmt}")
    query = admin.export_query([s.value for s in state] if state else None, received_from, received_to, band, zone)
    records: Iterator[dict[str, Any]] = admin.export_rows(factory, query, settings.severity_band_edges)
    chunks = admin.csv_chunks(records) if fmt == "csv" else admin.json_chunks(records)
    media = "text/csv; charset=utf-8" if fmt == "csv" else "application/json"
    return StreamingResponse(chunks, media_type=media, headers={
        "Content-Disposition": f'attachment; filename="cttriage-scores.{fmt}"', "Cache-Control": "no-store"})


@router.get("/audit", response_model=AuditLog)
def get_audit(
    session: SessionDep,
    _principal: Admin,
    study_uid: str | None = None,
    actor: str | None = None,
    action: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> AuditLog:
    """Who read or changed what, newest first."""
    query = select(AuditEvent)
    for column, value in ((AuditEvent.study_uid, study_uid), (AuditEvent.actor, actor), (AuditEvent.action, action)):
        if value is not None:
            query = query.where(column == value)
    total = session.execute(select(func.count()).select_from(query.subquery())).scalar_one()
    rows = session.execute(query.order_by(AuditEvent.id.desc()).limit(limit).offset(offset)).scalars().all()
    return AuditLog(items=[AuditEventOut.model_validate(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/prior-lookups", response_model=PriorLookups)
def list_prior_lookups(session: SessionDep, settings: SettingsDep, _principal: Admin,
                       limit: Annotated[int, Query(ge=1, le=500)] = 50) -> PriorLookups:
    """Looks for priors on the PACS (CTTRIAGE_PRIORS_*), newest first, each with its state and reason."""
    rows = session.execute(
        select(PriorLookup.id, Study.study_uid, Study.accession_number, PriorLookup.state, PriorLookup.reason,
               PriorLookup.prior_study_uid, PriorLookup.created_at, PriorLookup.finished_at)
        .join(Study, Study.id == PriorLookup.study_id).order_by(PriorLookup.id.desc()).limit(limit)
    ).all()
    return PriorLookups(enabled=settings.priors_enabled,
                        items=[PriorLookupOut.model_validate(row._mapping) for row in rows])
