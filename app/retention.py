"""Storage lifecycle: received files stay until their study is scored or rejected, plus a
retention period; then the files go and the rows (scores, reasons, history) stay.

Failed studies are never purged here: their data waits for a rescore or an explicit rejection.
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Study, StudyState, utcnow
from app.dicom.storage import storage_name

log = logging.getLogger(__name__)

PURGEABLE = (StudyState.scored.value, StudyState.rejected.value)


def purge_expired_studies(session_factory: sessionmaker[Session], storage_root: Path, retention_days: float,
                          now: datetime | None = None, limit: int = 500) -> int:
    """Delete the files of studies finished more than ``retention_days`` ago. Returns how many."""
    now = now or utcnow()
    cutoff = now - timedelta(days=retention_days)
    with session_factory() as session:
        expired = session.execute(
            select(Study.id, Study.study_uid)
            .where(Study.state.in_(PURGEABLE), Study.files_purged_at.is_(None), Study.last_received_at <= cutoff,
                   or_(Study.scored_at.is_(None), Study.scored_at <= cutoff))
            .limit(limit)
        ).all()
    purged = 0
    for study_id, study_uid in expired:
        with session_factory.begin() as session:
            # Only if still finished and quiet: a late instance reopens the study and keeps its files.
            claimed = session.execute(
                update(Study)
                .where(Study.id == study_id, Study.state.in_(PURGEABLE), Study.last_received_at <= cutoff)
                .values(files_purged_at=now)
            ).rowcount
            if claimed:
                shutil.rmtree(storage_root / storage_name(study_uid), ignore_errors=True)
                purged += 1
    if purged:
        log.info("expired studies purged from storage", extra={"count": purged})
    return purged
