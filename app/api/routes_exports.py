"""Results sent back to the PACS (SR, SEG, secondary capture): every export with its attempts
and last error, and an admin's retry of one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status
from pydantic import BaseModel
from sqlalchemy import select

from app.api.auth import Admin
from app.api.deps import BrokerDep, Offset, SessionDep, SessionFactoryDep, SettingsDep
from app.api.schemas import ExportOut
from app.db.models import Export, ExportState, Study
from app.errors import ConflictError, NotFoundError
from app.lifecycle import reset_export
from app.security import record_audit

router = APIRouter(prefix="/api/admin/exports", tags=["admin"])


class ExportListItem(ExportOut):
    study_uid: str


class ExportRetryAccepted(BaseModel):
    export: ExportOut
    #: False when the broker could not be reached: the export stays pending; retry again later.
    enqueued: bool


@router.get("", response_model=list[ExportListItem])
def list_exports(
    session: SessionDep,
    _principal: Admin,
    state: Annotated[list[ExportState] | None, Query(description="Only these states (repeatable).")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Offset = 0,
) -> list[ExportListItem]:
    """Newest first, with each one's attempts and last error."""
    query = select(Export, Study.study_uid).join(Study, Study.id == Export.study_id)
    if state:
        query = query.where(Export.state.in_([s.value for s in state]))
    rows = session.execute(query.order_by(Export.id.desc()).limit(limit).offset(offset)).all()
    return [ExportListItem(**ExportOut.model_validate(row).model_dump(), study_uid=uid) for row, uid in rows]


@router.post("/{export_id}/retry", response_model=ExportRetryAccepted, status_code=status.HTTP_202_ACCEPTED)
def retry_export(export_id: int, factory: SessionFactoryDep, settings: SettingsDep, broker: BrokerDep,
                 principal: Admin) -> ExportRetryAccepted:
    """Send it again, with a fresh set of attempts (after the node or the network is fixed)."""
    if not settings.export_enabled:
        raise ConflictError("export to the PACS is disabled (CTTRIAGE_EXPORT_ENABLED)")
    row = reset_export(factory, export_id)
    if row is None:
        raise NotFoundError(f"no export {export_id}")
    with factory.begin() as session:
        study_uid = session.execute(select(Study.study_uid).where(Study.id == row.study_id)).scalar_one()
        record_audit(session, principal, "retry_export", study_uid, f"export {export_id} ({row.kind})")
    try:
        enqueued = broker is not None and bool(broker.enqueue_export(row.result_id))
    except Exception:  # broker down: the row is pending, the assembler's outbox relay hands it over
        enqueued = False
    return ExportRetryAccepted(export=ExportOut.model_validate(row), enqueued=enqueued)
