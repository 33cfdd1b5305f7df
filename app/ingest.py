"""Receiving one instance: durable write, then a record in the database.

C-STORE and the HTTP upload both end here, so the two paths behave the same: the file is on disk
(fsynced) and recorded before the caller reports success, a re-sent SOP instance is idempotent,
and new instances for a study that was already queued or scored reopen it for a rescore, unless
they cannot change the scoring (our own objects sent back, anything not CT: ``app.dicom.own_objects``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from pydicom import Dataset
from sqlalchemy import Connection, Engine, bindparam, func, select, update
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Instance, QuarantinedFile, Series, Study, StudyState, utcnow
from app.db.upsert import dialect_name, ignoring_insert, insert_ignore
from app.db.write_gate import SqliteWriteGate
from app.dicom.own_objects import OwnObjectsPolicy, created_by_cttriage, never_scored_reason
from app.dicom.storage import (
    MAX_UID_LENGTH,
    IncomingFile,
    ensure_free_space,
    instance_path,
    quarantine_path,
    write_atomic,
)
from app.dicom.text_values import check_identifier, clean_json, clean_optional, clean_text
from app.errors import DatabaseUnavailableError, InvalidDicomError
from app.lifecycle import STUDY_TOUCHED, study_changed
from app.liveness import process_name
from models.dicom_headers import MAX_FRAMES, declared_frames, slice_headers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceivedInstance:
    """What the database needs to know of an instance, read once from its header."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    patient_age: str | None
    patient_sex: str | None
    headers: list[dict[str, Any]]
    patient_name: str | None = None
    patient_id: str | None = None
    issuer_of_patient_id: str | None = None
    patient_birth_date: str | None = None
    #: "SR", "SEG" or "SC" when cttriage itself wrote it (``app.dicom.own_objects``).
    created_by: str | None = None

    @property
    def never_scored_reason(self) -> str | None:
        """Why its series can never be the scored one; None when it may be (it may reopen a study)."""
        return never_scored_reason(self.modality, self.created_by)


#: The key marking our own objects' headers, so scoring leaves them out (``worker.jobs``).
CREATED_BY = "created_by"


@dataclass(frozen=True)
class StoredInstance:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    path: Path
    duplicate: bool


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    """The element as text the databases can store (``app.dicom.text_values``), cut to ``limit``."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return clean_optional(str(value)[:limit])


def describe_instance(ds: Dataset, transfer_syntax_uid: str) -> ReceivedInstance:
    """Read the keys and header fields we index on; raise InvalidDicomError when UIDs are missing."""
    # Read strictly: a UID pydicom cannot decode raises here (slice_headers reads leniently).
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID") if not ds.get(k)]
    if missing:
        raise InvalidDicomError(f"instance lacks {', '.join(missing)}")
    frames = declared_frames(ds) or 1
    if frames < 1:  # slice_headers would describe no frame at all
        raise InvalidDicomError(f"NumberOfFrames {frames} is not a frame count")
    if frames > MAX_FRAMES:  # a header is stored per frame
        raise InvalidDicomError(f"NumberOfFrames {frames} is more than the {MAX_FRAMES} accepted")
    headers = slice_headers(ds)
    created_by = created_by_cttriage(ds)
    first = headers[0]  # every frame shares the instance-level fields
    uids = {"StudyInstanceUID": first.study_uid, "SeriesInstanceUID": first.series_uid,
            "SOPInstanceUID": first.sop_instance_uid, "SOPClassUID": first.sop_class_uid}
    too_long = [keyword for keyword, uid in uids.items() if len(uid) > MAX_UID_LENGTH]
    if too_long:  # not a UID (PS3.5 9.1); a retry would not change that, so it is no 'retry later'
        raise InvalidDicomError(f"{', '.join(too_long)} longer than {MAX_UID_LENGTH} characters")
    # A NUL or an undecodable byte in a key or the date: no database stores it, and a retry would
    # not change it. Refused as unreadable (quarantined, 0xC000), never "retry later".
    study_date = ds.get("StudyDate")
    for keyword, value in (*uids.items(), ("StudyDate", None if study_date is None else str(study_date))):
        check_identifier(keyword, value)
    return ReceivedInstance(
        study_uid=first.study_uid,
        series_uid=first.series_uid,
        sop_instance_uid=first.sop_instance_uid,
        sop_class_uid=first.sop_class_uid,
        transfer_syntax_uid=str(transfer_syntax_uid),
        modality=clean_optional(first.modality[:16]),
        series_number=first.series_number,
        series_description=clean_optional(first.series_description[:128]),
        accession_number=_text(ds, "AccessionNumber", 64),
        study_date=_text(ds, "StudyDate", 8),
        study_description=_text(ds, "StudyDescription", 128),
        patient_age=_text(ds, "PatientAge", 8),
        patient_sex=_text(ds, "PatientSex", 4),
        headers=[clean_json({**h.to_dict(), CREATED_BY: created_by} if created_by else h.to_dict()) for h in headers],
        created_by=created_by,
        patient_name=_text(ds, "PatientName", 128),
        patient_id=_text(ds, "PatientID", 64),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID", 64),
        patient_birth_date=_text(ds, "PatientBirthDate", 8),
    )


# Built once: executed with parameters, their compiled forms are reused. Recording an instance
# is on the C-STORE hot path (once per instance, before the answer), so the usual case (a new
# instance of a study and series already known) takes three statements.
_STUDIES, _SERIES, _INSTANCES = Study.__table__, Series.__table__, Instance.__table__
_STUDY_ID = select(_STUDIES.c.id).where(_STUDIES.c.study_uid == bindparam("uid"))
_SERIES_ID = select(_SERIES.c.id).where(_SERIES.c.series_uid == bindparam("uid"))
_INSTANCE_VALUES = ("sop_instance_uid", "sop_class_uid", "transfer_syntax_uid", "path", "size_bytes", "received_at",
                    "receive_count", "source", "calling_aet", "headers", "received_by")


@cache
def _insert_into_known_series(dialect: str) -> Any:
    """INSERT the instance under its study and series found by UID, unless it is there already.

    Returns the study and series ids, or no row (the study or series is new, or a re-send).
    """
    source = (
        select(
            _STUDIES.c.id,
            _SERIES.c.id,
            *(bindparam(name, type_=_INSTANCES.c[name].type) for name in _INSTANCE_VALUES),
        )
        .join_from(_SERIES, _STUDIES, _SERIES.c.study_id == _STUDIES.c.id)
        .where(_STUDIES.c.study_uid == bindparam("study_uid"), _SERIES.c.series_uid == bindparam("series_uid"))
    )
    return (
        ignoring_insert(dialect, _INSTANCES, "sop_instance_uid")
        .from_select(["study_id", "series_id", *_INSTANCE_VALUES], source)
        .returning(_INSTANCES.c.study_id, _INSTANCES.c.series_id)
    )


_FILED_UNDER = select(_INSTANCES.c.study_id, _INSTANCES.c.series_id).where(
    _INSTANCES.c.sop_instance_uid == bindparam("uid"))
# A re-send's bytes replace the file: its row describes them (the encoding may differ), and says
# where the instance is filed now (a PACS merge or split moves instances, keeping their UIDs).
_RESENT = (
    update(_INSTANCES)
    .where(_INSTANCES.c.sop_instance_uid == bindparam("uid"))
    .values(receive_count=_INSTANCES.c.receive_count + 1, received_at=bindparam("now"),
            study_id=bindparam("sid"), series_id=bindparam("seid"), path=bindparam("path"),
            size_bytes=bindparam("size_bytes"), transfer_syntax_uid=bindparam("transfer_syntax_uid"),
            headers=bindparam("headers", type_=_INSTANCES.c.headers.type), received_by=bindparam("received_by"))
)
_SERIES_SHRANK = (
    update(_SERIES).where(_SERIES.c.id == bindparam("seid")).values(instance_count=_SERIES.c.instance_count - 1)
)
_SERIES_GREW = (
    update(_SERIES).where(_SERIES.c.id == bindparam("seid")).values(instance_count=_SERIES.c.instance_count + 1)
)
def _row_id(session: Connection | Session, lookup: Any, uid: str, insert: Callable[[], object]) -> int:
    """The id of the row keyed by ``uid``, inserting it first when it is new."""
    found = session.execute(lookup, {"uid": uid}).scalar_one_or_none()
    if found is not None:
        return int(found)
    insert()  # ignored if a concurrent association inserted it meanwhile
    return int(session.execute(lookup, {"uid": uid}).scalar_one())


def record_instance(
    session: Connection | Session,
    received: ReceivedInstance,
    *,
    path: Path,
    size_bytes: int,
    source: str,
    calling_aet: str | None,
    now: datetime,
) -> bool:
    """Insert or refresh the rows for one instance. Returns True when it was a re-send."""
    instance = {
        "sop_instance_uid": received.sop_instance_uid,
        "sop_class_uid": received.sop_class_uid,
        "transfer_syntax_uid": received.transfer_syntax_uid,
        "path": str(path),
        "size_bytes": size_bytes,
        "received_at": now,
        "receive_count": 1,
        "source": source,
        "calling_aet": calling_aet,
        "headers": received.headers,
        "received_by": process_name(),
    }
    changed = study_changed(never_scored=received.never_scored_reason is not None)
    statement = _insert_into_known_series(dialect_name(session))
    known = session.execute(
        statement, {**instance, "study_uid": received.study_uid, "series_uid": received.series_uid}
    ).first()
    if known is not None:
        study_id, series_id = known
    else:  # the first instance of its study or series, or a re-send
        study_id = _row_id(session, _STUDY_ID, received.study_uid, lambda: insert_ignore(
            session,
            Study,
            {
                "study_uid": received.study_uid,
                "accession_number": received.accession_number,
                "study_date": received.study_date,
                "study_description": received.study_description,
                "patient_age": received.patient_age,
                "patient_sex": received.patient_sex,
                "patient_name": received.patient_name,
                "patient_id": received.patient_id,
                "issuer_of_patient_id": received.issuer_of_patient_id,
                "patient_birth_date": received.patient_birth_date,
                "state": StudyState.receiving.value,
                "version": 1,
                "first_received_at": now,
                "last_received_at": now,
                "instance_count": 0,
            },
            "study_uid",
        ))
        series_id = _row_id(session, _SERIES_ID, received.series_uid, lambda: insert_ignore(
            session,
            Series,
            {
                "study_id": study_id,
                "series_uid": received.series_uid,
                "modality": received.modality,
                "series_number": received.series_number,
                "description": received.series_description,
                "instance_count": 0,
                "chosen": False,
                "skip_reason": received.never_scored_reason,
            },
            "series_uid",
        ))
        inserted = insert_ignore(
            session, Instance, {**instance, "study_id": study_id, "series_id": series_id}, "sop_instance_uid"
        )
        if not inserted:
            return _record_resend(session, instance, study_id, series_id, now, changed)
    session.execute(_SERIES_GREW, {"seid": series_id})
    session.execute(changed, {"sid": study_id, "now": now, "by": 1})
    return False


def _record_resend(session: Connection | Session, instance: dict[str, Any], study_id: int, series_id: int,
                   now: datetime, changed: Any) -> bool:
    """A SOP instance received before: refresh its row. Filed where it was, that is all (a retry,
    no rescore); filed under another study or series now, it moves there, and both studies are
    reopened to be scored on what they now hold. Returns True for a plain re-send."""
    old_study_id, old_series_id = session.execute(_FILED_UNDER, {"uid": instance["sop_instance_uid"]}).one()
    session.execute(_RESENT, {
        "uid": instance["sop_instance_uid"], "now": now, "sid": study_id, "seid": series_id, "path": instance["path"],
        "size_bytes": instance["size_bytes"], "transfer_syntax_uid": instance["transfer_syntax_uid"],
        "headers": instance["headers"], "received_by": instance["received_by"],
    })
    if (old_study_id, old_series_id) == (study_id, series_id):
        session.execute(STUDY_TOUCHED, {"sid": study_id, "now": now})
        return True
    session.execute(_SERIES_SHRANK, {"seid": old_series_id})
    session.execute(changed, {"sid": old_study_id, "now": now, "by": -1})
    session.execute(_SERIES_GREW, {"seid": series_id})
    session.execute(changed, {"sid": study_id, "now": now, "by": 1})
    return False


def store_instance(
    incoming: IncomingFile,
    received: ReceivedInstance,
    *,
    storage_root: Path,
    session_factory: sessionmaker[Session],
    source: str,
    calling_aet: str | None,
    own_objects: OwnObjectsPolicy = "store",
    write_gate: SqliteWriteGate | None = None,
    syncer: Executor | None = None,
) -> StoredInstance:
    """Record an instance and commit once its bytes are durable under its UID path.

    A new instance's file is placed before the transaction (nothing points at it until the record
    commits); with ``syncer`` its fsyncs run there while the record's statements execute, and the
    commit waits for them. A re-send's bytes replace the ones a committed row points at inside the
    transaction, after the record's statements. No committed row ever points at a file not yet
    durable, and a record that fails leaves no new file behind (``incoming`` removes what it
    placed unless kept). The statements go through a Core
    connection, as this is the C-STORE hot path; with ``write_gate`` (SQLite) the transaction waits
    its turn there, not in SQLite's busy sleeps. Raises typed errors. With ``own_objects`` "drop",
    an object cttriage wrote is neither kept nor recorded (reported as a duplicate: nothing new).
    """
    path = instance_path(storage_root, received.study_uid, received.series_uid, received.sop_instance_uid)
    if received.created_by is not None and own_objects == "drop":
        log.debug("own object sent back, dropped", extra={"kind": received.created_by})
        return StoredInstance(received.study_uid, received.series_uid, received.sop_instance_uid, path, duplicate=True)
    engine: Engine = session_factory.kw["bind"]
    # outside the transaction, which holds the write lock (SQLite: one for every listener) to commit
    placed = incoming.placed_at == path or incoming.place_if_new(path, syncer)
    try:
        with write_gate.held() if write_gate is not None else nullcontext(), engine.begin() as connection:
            duplicate = record_instance(
                connection,
                received,
                path=path,
                size_bytes=incoming.size,
                source=source,
                calling_aet=calling_aet,
                now=utcnow(),
            )
            if placed:
                incoming.wait_durable()
            else:
                incoming.replace_existing(path)
    except (DataError, UnicodeEncodeError) as exc:
        # A value the database cannot store that cleaning missed: the same bytes would fail on
        # every retry, so they are refused as unreadable (quarantined), not "retry later".
        log.warning("database refused a value of an instance", extra={"error": type(exc).__name__})
        raise InvalidDicomError(f"the database cannot store a value of this instance ({type(exc).__name__})") from exc
    except (OperationalError, DBAPIError, PoolTimeoutError) as exc:  # pool timeout: all connections busy
        # Nothing is recorded and the placed file goes again with ``incoming``; the sender retries.
        log.warning("database unavailable while recording an instance", extra={"error": type(exc).__name__})
        raise DatabaseUnavailableError("the database could not record the instance; retry later") from exc
    incoming.keep()
    return StoredInstance(received.study_uid, received.series_uid, received.sop_instance_uid, path, duplicate)


def quarantine_bytes(
    data: bytes,
    reason: str,
    *,
    storage_root: Path,
    min_free_bytes: int,
    session_factory: sessionmaker[Session],
    source: str,
    original_name: str | None = None,
    calling_aet: str | None = None,
    max_total_bytes: int | None = None,
) -> int:
    """Keep bytes we could not use, with the reason, so an admin can see what was refused. Beyond
    ``max_total_bytes`` (None: no quota) only the row is kept: path "" and the reason says so."""
    path: Path | None = None
    if max_total_bytes is not None and _quarantine_held_bytes(session_factory) + len(data) > max_total_bytes:
        reason = f"{reason} (bytes not kept: quarantine quota of {max_total_bytes} bytes reached)"
        log.warning("quarantine quota reached: bytes not kept", extra={"size": len(data), "source": source})
    else:
        ensure_free_space(storage_root, len(data), min_free_bytes)
        path = quarantine_path(storage_root)
        write_atomic(path, data)
    try:
        with session_factory.begin() as session:
            row = QuarantinedFile(
                path=str(path) if path else "",
                original_name=clean_optional(original_name),  # a sender's name or UID: may hold a NUL
                size_bytes=len(data),
                reason=clean_text(reason),
                source=source,
                calling_aet=calling_aet,
                received_at=utcnow(),
            )
            session.add(row)
            session.flush()
            return row.id
    except BaseException:
        if path is not None:
            path.unlink(missing_ok=True)  # without its row nothing would ever show or remove it
        raise


def _quarantine_held_bytes(session_factory: sessionmaker[Session]) -> int:
    with session_factory() as session:
        return int(session.execute(select(func.coalesce(func.sum(QuarantinedFile.size_bytes), 0))
                                   .where(QuarantinedFile.path != "")).scalar_one())
