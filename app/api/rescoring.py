"""An admin's rescore, shared by ``POST /api/studies/{uid}/rescore`` and the admin page's retry."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from app.api.schemas import RescoreAccepted
from app.broker import Broker
from app.errors import NotFoundError
from app.lifecycle import request_rescore
from app.outbox import dispatch_pending_jobs
from app.security import Principal, record_audit


def rescore(factory: sessionmaker[Session], broker: Broker | None, study_uid: str,
            principal: Principal) -> RescoreAccepted:
    """Queue a new version of the study, audited, and hand it to the broker at once when there is
    one (otherwise, or while it is down, the assembler's outbox relay does)."""
    job_id = request_rescore(factory, study_uid)
    if job_id is None:
        raise NotFoundError(f"no study {study_uid}")
    with factory.begin() as session:
        record_audit(session, principal, "rescore", study_uid, f"job {job_id}")
    enqueued = bool(broker and dispatch_pending_jobs(factory, broker.enqueue_scoring))
    return RescoreAccepted(study_uid=study_uid, job_id=job_id, enqueued=enqueued)
