"""Storage lifecycle: received files stay until their study is scored or rejected, plus a
retention period; then the files, the masks and pictures derived from them, and the instance rows
that index them go, and the rest (scores, reasons, series, history) stays.

Failed studies are never purged here: their data waits for a rescore or an explicit rejection.
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Instance, QuarantinedFile, Series, Study, utcnow
from app.dicom.storage import derived_study_dir, storage_name
from app.lifecycle import PURGEABLE, mark_files_purged

log = logging.getLogger(__name__)



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
            if mark_files_purged(session, study_id, cutoff, now):
                # The instance rows only index files: they go with them. An instance sent again
                # later is then new, reopens the study (a new version, files_purged_at cleared) and
                # is scored on what is on disk, never on rows whose files are gone.
                session.execute(delete(Instance).where(Instance.study_id == study_id))
                session.execute(update(Series).where(Series.study_id == study_id).values(instance_count=0))
                shutil.rmtree(storage_root / storage_name(study_uid), ignore_errors=True)
                # The masks hold the CT itself on the scoring grid, the pictures show it: they go too
                # (the study page then says the pictures are gone with retention).
                shutil.rmtree(derived_study_dir(storage_root, study_uid), ignore_errors=True)
                purged += 1
    if purged:
        log.info("expired studies purged from storage", extra={"count": purged})
    return purged


def purge_expired_quarantine(session_factory: sessionmaker[Session], retention_days: float,
                             now: datetime | None = None, limit: int = 1000) -> int:
    """Delete quarantined files, and their rows, received more than ``retention_days`` ago:
    refused bytes are kept for an admin to look at, not for ever. Returns how many."""
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    with session_factory.begin() as session:
        rows = session.execute(
            select(QuarantinedFile.id, QuarantinedFile.path).where(QuarantinedFile.received_at <= cutoff).limit(limit)
        ).all()
        if rows:
            session.execute(delete(QuarantinedFile).where(QuarantinedFile.id.in_([r[0] for r in rows])))
    for _, path in rows:  # after the commit: a row never points at a file already gone
        if path:
            Path(path).unlink(missing_ok=True)
    if rows:
        log.info("expired quarantine purged", extra={"count": len(rows)})
    return len(rows)
