"""Studies: the worklist, one study's detail, uploads over HTTP, rescoring, quarantine."""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from datetime import date
from typing import Annotated, Literal, TypeVar

import pydicom
from fastapi import APIRouter, File, Query, UploadFile, status
from fastapi.responses import FileResponse, JSONResponse
from pydantic import Field
from sqlalchemy import func, select
from sqlalchemy.orm import selectinload
from starlette.concurrency import run_in_threadpool

from app.api.auth import Admin, Radiologist
from app.api.deps import BrokerDep, DayZoneDep, Offset, SessionDep, SessionFactoryDep, SettingsDep
from app.api.problems import problem
from app.api.rescoring import rescore
from app.api.schemas import (
    PatientStudies,
    PatientStudyOut,
    QuarantinedOut,
    RescoreAccepted,
    StudyDetail,
    UploadedFile,
    UploadReport,
    Worklist,
    WorklistItem,
)
from app.counters import INSTANCES_TOO_LARGE, add_counts
from app.db.models import QuarantinedFile, Result, Series, Study, StudyState
from app.errors import InstanceTooLargeError, InvalidDicomError, NotFoundError, QuarantinedError
from app.priors import patient_studies, trend
from app.receive import Origin, receive_instance
from app.security import record_audit
from app.settings import Settings
from app.worklist import worklist_order, worklist_query

router = APIRouter(prefix="/api", tags=["studies"])

#: Upload limits: a whole CT study zipped is a few hundred MB at most.
MAX_ZIP_MEMBERS = 20000
ItemT = TypeVar("ItemT", bound=WorklistItem)
#: ``source`` of what arrives by upload.
UPLOAD = "upload"


@router.get("/worklist", response_model=Worklist)
def get_worklist(
    session: SessionDep,
    settings: SettingsDep,
    _principal: Radiologist,
    zone: DayZoneDep,
    state: Annotated[list[StudyState] | None, Query(description="Only these states (repeatable).")] = None,
    received_from: Annotated[date | None, Query(description="First received on or after this day (in tz).")] = None,
    received_to: Annotated[date | None, Query(description="First received on or before this day (in tz).")] = None,
    band: Annotated[list[Annotated[int, Field(ge=0, le=4)]] | None,
                    Query(description="Only these severity bands, CT-0..CT-4 as 0..4 (repeatable).")] = None,
    patient_id: Annotated[str | None, Query(max_length=64, description="Only this patient ID (exact).")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Offset = 0,
) -> Worklist:
    query = worklist_query([s.value for s in state] if state else None, received_from, received_to, band, zone,
                           patient_id=patient_id)
    total = session.execute(select(func.count()).select_from(query.subquery())).scalar_one()
    rows = session.execute(query.order_by(*worklist_order()).limit(limit).offset(offset)).scalars().all()
    modalities = study_modalities(session, [r.id for r in rows])
    items = [shown(WorklistItem.model_validate(r), settings, modalities.get(r.id, [])) for r in rows]
    return Worklist(items=items, total=total, limit=limit, offset=offset)


def study_modalities(session: SessionDep, study_ids: list[int]) -> dict[int, list[str]]:
    """Each study's series modalities (one query for a worklist page)."""
    found: dict[int, set[str]] = {}
    if study_ids:
        for study_id, modality in session.execute(
                select(Series.study_id, Series.modality).where(Series.study_id.in_(study_ids)).distinct()):
            if modality:
                found.setdefault(study_id, set()).add(modality)
    return {k: sorted(v) for k, v in found.items()}


def shown(item: ItemT, settings: Settings, modalities: list[str]) -> ItemT:
    """The item with its modalities (CT first, "CT/SEG/SR") and its viewer link."""
    ordered = sorted(modalities, key=lambda m: (m != "CT", m))
    return item.model_copy(update={"modality": "/".join(ordered) or None,
                                   "viewer_url": settings.viewer_url(item.study_uid, item.accession_number),
                                   "trend": trend(item.severity_change, settings.trend_points)})


def get_study(study_uid: str, session: SessionDep, settings: SettingsDep, principal: Radiologist) -> StudyDetail:
    """One study. A UID holding "/" is sent percent-encoded (``%2F``): the route takes the rest of
    the path, so it is registered after the routes under a study (pictures)."""
    study = session.execute(
        select(Study)
        .where(Study.study_uid == study_uid)
        .options(selectinload(Study.series), selectinload(Study.jobs), selectinload(Study.results),
                 selectinload(Study.exports))
    ).scalar_one_or_none()
    if study is None:
        raise NotFoundError(f"no study {study_uid}")
    detail = shown(StudyDetail.model_validate(study), settings, [x.modality for x in study.series if x.modality])
    record_audit(session, principal, "read_study", study_uid)
    session.commit()
    return detail


@router.get("/studies/{study_uid:path}/images/{kind}.png", response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}}})
def get_study_image(study_uid: str, kind: Literal["axial", "projection"], session: SessionDep,
                    settings: SettingsDep, _principal: Radiologist) -> FileResponse:
    """The newest scoring's picture: the most affected axial slice, or the frontal projection,
    with lesions overlaid."""
    result = session.execute(
        select(Result).join(Study).where(Study.study_uid == study_uid).order_by(Result.id.desc()).limit(1)
    ).scalar_one_or_none()
    relative = ((result.details or {}).get("files") or {}).get(kind) if result else None
    if not relative:
        raise NotFoundError(f"no {kind} picture for study {study_uid}")
    path = (settings.storage_root / relative).resolve()
    if settings.storage_root.resolve() not in path.parents or not path.is_file():
        raise NotFoundError(f"the {kind} picture of study {study_uid} is gone (retention)")
    return FileResponse(path, media_type="image/png")


@router.get("/patients/{patient_id}/studies", response_model=PatientStudies)
def get_patient_studies(patient_id: str, session: SessionDep, settings: SettingsDep,
                        principal: Radiologist) -> PatientStudies:
    """The patient's scored studies, oldest first, each with its change since its prior: the
    scores over time. A patient ID holding "/" is sent percent-encoded."""
    studies = patient_studies(session, patient_id)
    if not studies:
        raise NotFoundError("no scored study of this patient")
    items = [PatientStudyOut.model_validate(s) for s in studies]
    items = [i.model_copy(update={"trend": trend(i.severity_change, settings.trend_points)}) for i in items]
    for item in items:  # the audit names the studies read; the patient ID stays out of it
        record_audit(session, principal, "read_study", item.study_uid, "patient's studies")
    session.commit()
    return PatientStudies(patient_id=patient_id, studies=items)


router.add_api_route("/studies/{study_uid:path}", get_study, methods=["GET"], response_model=StudyDetail)


def _uploaded_instances(upload: UploadFile, settings: SettingsDep,
                        factory: SessionFactoryDep) -> list[UploadedFile]:
    """Store one uploaded file, or each file of an uploaded zip (folders ignored). A zip is read
    from its spooled file a member at a time, and a member is refused by its declared unpacked
    size before it is unpacked: a small zip of zeros cannot fill memory. A member that cannot be
    unpacked is reported on its own: the members stored before and after it stay stored."""
    source = upload.file
    source.seek(0)
    if not zipfile.is_zipfile(source):
        size = source.seek(0, io.SEEK_END)
        if size > settings.max_instance_bytes:
            _too_large(factory, f"a file of {size} bytes, above the limit of {settings.max_instance_bytes}")
        source.seek(0)
        return [_store_uploaded(upload.filename, source.read(), settings, factory)]
    source.seek(0)
    try:
        with zipfile.ZipFile(source) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if len(members) > MAX_ZIP_MEMBERS:
                raise InvalidDicomError(f"zip holds {len(members)} files, more than {MAX_ZIP_MEMBERS}")
            # Declared sizes bound what zipfile unpacks: checked before anything is unpacked.
            unpacked = sum(m.file_size for m in members)
            if unpacked > settings.max_zip_unpacked_bytes:
                _too_large(factory, f"a zip of {unpacked} bytes unpacked, above the limit of "
                                    f"{settings.max_zip_unpacked_bytes}")
            outcomes = []
            for member in members:
                if member.file_size > settings.max_instance_bytes:
                    outcomes.append(_refused(member.filename, f"{member.file_size} bytes unpacked, more than "
                                                              f"{settings.max_instance_bytes}"))
                    continue
                try:
                    data = archive.read(member)
                except Exception as exc:
                    outcomes.append(_refused(member.filename, f"zip member cannot be unpacked ({type(exc).__name__})"))
                    continue
                outcomes.append(_store_uploaded(member.filename, data, settings, factory))
            return outcomes
    except (zipfile.BadZipFile, InvalidDicomError) as exc:
        return [_refused(upload.filename, str(exc))]


def _refused(name: str | None, reason: str) -> UploadedFile:
    """A file that was neither stored nor quarantined (no bytes to keep), with the reason."""
    return UploadedFile(filename=name, stored=False, status="refused", error=reason)


def _too_large(factory: SessionFactoryDep, detail: str) -> None:
    """Refuse the whole upload with 413 (counted in /metrics); nothing of it is kept."""
    add_counts(factory, Counter({(INSTANCES_TOO_LARGE, "upload"): 1}))
    raise InstanceTooLargeError(detail)


def _store_uploaded(name: str | None, data: bytes, settings: SettingsDep, factory: SessionFactoryDep) -> UploadedFile:
    """Store one instance as C-STORE would (:func:`app.receive.receive_instance`); unreadable
    bytes are quarantined, a line of the report. Errors that a retry can cure (storage full,
    database away) propagate as the request's HTTP problem."""
    def decode() -> tuple[pydicom.Dataset, str]:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
        return ds, str(ds.file_meta.TransferSyntaxUID)

    try:
        stored = receive_instance((data,), decode, Origin(UPLOAD, name=name), settings, factory,
                                  unreadable="not a readable DICOM Part 10 file")
    except QuarantinedError as exc:
        return UploadedFile(filename=name, stored=False, status="quarantined", error=str(exc))
    return UploadedFile(filename=name, stored=True, status="duplicate" if stored.duplicate else "stored",
                        study_uid=stored.study_uid, sop_instance_uid=stored.sop_instance_uid,
                        duplicate=stored.duplicate)


@router.post("/studies", response_model=UploadReport, status_code=status.HTTP_202_ACCEPTED,
             responses={207: {"model": UploadReport, "description": "Some files stored, others not: see `files`"},
                        400: {"description": "No file was stored; `files` says why for each"},
                        413: {"description": "A file or a zip's unpacked total above the size limits"}})
async def upload_study(
    files: Annotated[list[UploadFile], File(description="DICOM Part 10 files, or zip archives of them")],
    settings: SettingsDep,
    factory: SessionFactoryDep,
    principal: Admin,
) -> UploadReport | JSONResponse:
    """Same path as C-STORE: each instance is written durably and recorded; the study is scored
    once it settles. Every file gets a line in the report (stored, duplicate, quarantined or
    refused, with the reason): 202 when all were stored, 207 when some were, 400 when none."""
    outcomes: list[UploadedFile] = []
    try:
        for upload in files:  # disk and database work: off the event loop, which serves the live streams
            outcomes.extend(await run_in_threadpool(_uploaded_instances, upload, settings, factory))
    finally:  # storage full or database away half-way: what was stored is still audited
        await run_in_threadpool(_audit_upload, outcomes, factory, principal)
    report = upload_report(outcomes)
    if report.stored == 0:
        return problem(400, "No DICOM instance stored", "no uploaded file was stored; see files for each reason",
                       **report.model_dump(exclude={"files"}), files=[o.model_dump() for o in outcomes])
    if report.stored < len(outcomes):
        return JSONResponse(report.model_dump(), status_code=status.HTTP_207_MULTI_STATUS)
    return report


def upload_report(outcomes: list[UploadedFile]) -> UploadReport:
    """Counts by outcome beside the per-file list."""
    stored = sum(o.stored for o in outcomes)
    return UploadReport(stored=stored, rejected=len(outcomes) - stored,
                        duplicates=sum(o.status == "duplicate" for o in outcomes),
                        quarantined=sum(o.status == "quarantined" for o in outcomes), files=outcomes)


def _audit_upload(outcomes: list[UploadedFile], factory: SessionFactoryDep, principal: Admin) -> None:
    """One audit row per study touched, or one without a study when nothing was stored: an upload
    is audited whatever came of it (counts only: file names may carry patient data)."""
    report = upload_report(outcomes)
    detail = f"{report.stored} instances stored, {report.quarantined} quarantined, {report.rejected} not stored"
    uids = sorted({o.study_uid for o in outcomes if o.study_uid})
    with factory.begin() as session:
        for uid in uids if uids else [None]:
            record_audit(session, principal, "upload", uid, detail)


@router.post("/studies/{study_uid:path}/rescore", response_model=RescoreAccepted, status_code=status.HTTP_202_ACCEPTED)
def rescore_study(study_uid: str, factory: SessionFactoryDep, broker: BrokerDep,
                  principal: Admin) -> RescoreAccepted:
    """Score the study again (a new version, audited), e.g. after a new model is installed."""
    return rescore(factory, broker, study_uid, principal)


@router.get("/quarantine", response_model=list[QuarantinedOut])
def list_quarantine(
    session: SessionDep,
    _principal: Admin,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Offset = 0,
) -> list[QuarantinedOut]:
    """Received bytes that could not be attached to a study, newest first, with the reason."""
    rows = session.execute(
        select(QuarantinedFile).order_by(QuarantinedFile.id.desc()).limit(limit).offset(offset)
    ).scalars().all()
    return [QuarantinedOut.model_validate(r) for r in rows]

