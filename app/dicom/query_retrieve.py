"""C-FIND and C-MOVE SCU (Study Root): find a patient's earlier CT studies on the PACS and have
one sent to cttriage's own AE (``app.prior_lookups``). Failures raise :class:`QueryRetrieveError`
with the reason in words; nothing here touches the database."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # made at import time: no stub sees them
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

PENDING = (0xFF00, 0xFF01)
MOVE_PENDING = 0xFF00


class QueryRetrieveError(RuntimeError):
    """The query/retrieve node could not be reached or answered with a failure."""


@dataclass(frozen=True)
class QueryNode:
    """Where to query and retrieve, and as whom."""

    host: str
    port: int
    called_aet: str
    calling_aet: str
    timeout_seconds: float = 30.0


@dataclass(frozen=True)
class FoundStudy:
    study_uid: str
    study_date: str | None


def _associate(node: QueryNode, context: str) -> object:
    ae = AE(ae_title=node.calling_aet)
    ae.add_requested_context(context)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = node.timeout_seconds
    ae.connection_timeout = node.timeout_seconds
    assoc = ae.associate(node.host, node.port, ae_title=node.called_aet)
    if not assoc.is_established:
        raise QueryRetrieveError(f"no association with {node.called_aet} at {node.host}:{node.port} "
                                 "(refused, aborted or not reachable)")
    return assoc


def find_ct_studies(node: QueryNode, patient_id: str, issuer: str | None, date_range: str) -> list[FoundStudy]:
    """The patient's studies holding CT within ``date_range`` (DICOM DA range "YYYYMMDD-YYYYMMDD")."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient_id
    if issuer:
        query.IssuerOfPatientID = issuer
    query.ModalitiesInStudy = "CT"
    query.StudyDate = date_range
    query.StudyInstanceUID = ""
    assoc = _associate(node, StudyRootQueryRetrieveInformationModelFind)
    found: list[FoundStudy] = []
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):  # type: ignore[attr-defined]
            if not status:
                raise QueryRetrieveError("C-FIND got no answer (timed out or aborted)")
            code = int(status.Status)
            if code in PENDING and identifier is not None and identifier.get("StudyInstanceUID"):
                study_date = str(identifier.get("StudyDate") or "") or None
                found.append(FoundStudy(str(identifier.StudyInstanceUID), study_date))
            elif code not in PENDING and code != 0:
                raise QueryRetrieveError(f"C-FIND failed with status 0x{code:04X}")
    finally:
        assoc.release()  # type: ignore[attr-defined]
    return found


def move_study(node: QueryNode, study_uid: str, destination_aet: str) -> int:
    """Have the node send the study to ``destination_aet``; returns the instances it sent."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    assoc = _associate(node, StudyRootQueryRetrieveInformationModelMove)
    completed = 0
    try:
        for status, _identifier in assoc.send_c_move(  # type: ignore[attr-defined]
                query, destination_aet, StudyRootQueryRetrieveInformationModelMove):
            if not status:
                raise QueryRetrieveError("C-MOVE got no answer (timed out or aborted)")
            code = int(status.Status)
            completed = int(status.get("NumberOfCompletedSuboperations", completed) or completed)
            if code == MOVE_PENDING:
                continue
            failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
            if code != 0 or failed:
                raise QueryRetrieveError(f"C-MOVE ended with status 0x{code:04X}, {failed} instances not sent"
                                         f" (does the node know {destination_aet} as a destination?)")
    finally:
        assoc.release()  # type: ignore[attr-defined]
    return completed
