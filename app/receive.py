"""The receive sequence shared by C-STORE (``app.dicom.listener``) and the HTTP upload
(``app.api.routes_studies``): write, describe, place, record, commit.

The bytes are written (flushed) while the header is read; the file is placed under its UID path
and the instance recorded, committed once the file is durable (:func:`app.ingest.store_instance`).
The listener places the file as soon as the header's UIDs are read, with its fsyncs on a syncer
thread, so they overlap the describing and recording. Unreadable bytes are kept in the
quarantine for an admin. Every failure leaves as a typed error (``app.errors``), which each caller
maps once: the listener to a C-STORE status, the API to an HTTP problem.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TypeVar

from pydicom import Dataset
from sqlalchemy.orm import Session, sessionmaker

from app.db.write_gate import SqliteWriteGate
from app.dicom.storage import IncomingFile, instance_path
from app.errors import CtTriageError, InvalidDicomError, QuarantinedError
from app.ingest import StoredInstance, describe_instance, quarantine_bytes, store_instance
from app.settings import Settings
from models.dicom_headers import instance_uids

#: Decodes the received bytes: the dataset and the transfer syntax it was sent in.
Decode = Callable[[], tuple[Dataset, str]]
T = TypeVar("T")


@dataclass(frozen=True)
class Origin:
    """Where an instance came from, kept with its rows."""

    source: str  # "dicom" or "upload"
    calling_aet: str | None = None
    #: The sender's name for the bytes (a file name, the affected SOP instance UID), kept with a quarantine.
    name: str | None = None


def receive_instance(parts: Sequence[bytes], decode: Decode, origin: Origin, settings: Settings,
                     session_factory: sessionmaker[Session], *, unreadable: str,
                     write_gate: SqliteWriteGate | None = None, syncer: Executor | None = None) -> StoredInstance:
    """Store one instance, a DICOM file in ``parts`` (written one after another), durably and
    record it (its fsyncs on ``syncer`` while the record is written, if given). Raises typed
    errors only for what the receive itself names; unreadable bytes (whatever pydicom raises on
    them is ``unreadable`` with the exception's type, never its message, which may quote element
    values) raise :class:`QuarantinedError` once kept in the quarantine."""
    try:
        with IncomingFile(settings.storage_root, *parts, min_free_bytes=settings.min_free_bytes) as incoming:
            dataset, transfer_syntax = _read(decode, unreadable)
            if syncer is not None:
                _place_early(incoming, dataset, settings, syncer)
            received = _read(lambda: describe_instance(dataset, transfer_syntax), unreadable)
            return store_instance(incoming, received, storage_root=settings.storage_root,
                                  session_factory=session_factory, source=origin.source,
                                  calling_aet=origin.calling_aet, own_objects=settings.own_objects,
                                  write_gate=write_gate, syncer=syncer)
    except InvalidDicomError as exc:  # retrying will not help: keep the bytes for an admin
        raise _quarantine(b"".join(parts), exc, origin, settings, session_factory) from exc


def _read(read: Callable[[], T], unreadable: str) -> T:
    """Decode or describe received bytes. pydicom decodes lazily: a malformed element fails when
    first read, inside :func:`describe_instance`; whatever it raises is ``unreadable``."""
    try:
        return read()
    except CtTriageError:
        raise
    except Exception as exc:
        raise InvalidDicomError(f"{unreadable} ({type(exc).__name__})") from exc


def _place_early(incoming: IncomingFile, dataset: Dataset, settings: Settings, syncer: Executor) -> None:
    """Give the bytes their UID path and start their fsyncs on ``syncer`` before the header is
    described, so the disk's wait (mostly the journal's commit) runs beside the CPU's work of
    describing and recording; :func:`store_instance` finds them placed. Where a UID is missing,
    or the path is taken (a re-send), that is left to :func:`store_instance`."""
    uids = instance_uids(dataset)
    if not all(uids):
        return
    if incoming.place_if_new(instance_path(settings.storage_root, *uids), syncer):
        # Describing holds the GIL for a millisecond or more, and a thread waiting for it would
        # wait that long (or the 5 ms switch interval) to start its fsync: give it the GIL now.
        time.sleep(0)


def _quarantine(data: bytes, error: InvalidDicomError, origin: Origin, settings: Settings,
                session_factory: sessionmaker[Session]) -> QuarantinedError:
    """Keep the bytes with the reason; a failure to keep them (storage full, database away)
    propagates, to be answered as itself."""
    quarantine_bytes(data, str(error), storage_root=settings.storage_root, session_factory=session_factory,
                     source=origin.source, calling_aet=origin.calling_aet, original_name=origin.name,
                     min_free_bytes=settings.min_free_bytes, max_total_bytes=settings.quarantine_max_bytes)
    return QuarantinedError(str(error))
