"""Results back to the PACS: which objects to send for a result, sending them, and every
attempt's outcome in the ``exports`` table.

After a scoring (export enabled), :func:`app.lifecycle.add_exports` writes one pending row per
object (SR always; SEG and secondary capture where the masks and the projection were saved) and
:mod:`app.outbox` hands the result to the broker; the export task runs :func:`run_export`, which
builds the pending objects (the pure writers, :mod:`worker.export_sr` etc.) and sends them over
one association. A network failure or a non-success status keeps an object pending with the
error, for a retry after an exponential backoff, until ``export_max_attempts``; then it is
failed, and an admin may retry it (:func:`app.lifecycle.reset_export`). An object that cannot be
built fails at once: trying again would fail the same way.

Amendments. Every scoring of a study is exported into the same three series (SR, SEG, SC), whose
UIDs are derived from the study UID (:func:`worker.export_common.study_series_uid`), each object
with the next instance number; a new SR lists the study's last SR that was sent in its
Predecessor Documents Sequence. So the PACS shows one current report and its history.

Hold. With ``export_hold_seconds``, a result's rows are due only that long after the scoring; a
newer result of the study written meanwhile supersedes every pending row of older results (state
``superseded``), so a study sent in parts sends only its newest scoring.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.uid import Comprehensive3DSRStorage
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Export, ExportKind, ExportState, Instance, Result, Series, Study, utcnow
from app.dicom.push import NOT_ACCEPTED, push_datasets
from app.settings import Settings
from models.dicom_headers import slice_headers, stack_geometry
from models.errors import VolumeError

log = logging.getLogger(__name__)

#: Sends datasets to the configured node: push_datasets' signature.
Send = Callable[..., list[int]]
#: Built and sent in this order: the SR references the SEG.
BUILD_ORDER = (ExportKind.seg, ExportKind.sr, ExportKind.sc)
#: A row due this soon counts as due: a task retried after exactly the backoff may start a hair early.
DUE_TOLERANCE = timedelta(seconds=1)


@dataclass(frozen=True)
class ExportRun:
    """What one run of the export task left: counts per state, and when to try again."""

    result_id: int
    sent: int
    failed: int
    pending: int
    retry_in: float | None  # seconds; None when nothing is left to retry


def backoff_seconds(attempts: int, settings: Settings) -> float:
    """Wait after the ``attempts``-th failed send: the base doubling, capped."""
    return float(min(settings.export_backoff_seconds * 2 ** max(attempts - 1, 0), settings.export_backoff_max_seconds))


# --- building ---------------------------------------------------------------------------------


#: Type 2 attributes every object copies from its sources (patient and study modules). Type 2
#: means present, maybe empty; anonymised or unscheduled studies often leave them out altogether,
#: and highdicom then cannot build the SR or SEG at all.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber",
                "StudyDate", "StudyTime", "ReferringPhysicianName")


def read_headers(paths: Sequence[Path]) -> list[Dataset]:
    """The source instances' headers (the writers never need their pixel data), with absent Type 2
    patient and study attributes present and empty, as the objects must carry them, and a slice
    thickness (the slice step) where none is stated."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} source instances are gone from storage "
                                "(retention?)")
    headers: list[Dataset] = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    step = slice_step_mm(headers)
    for ds in headers:
        for keyword in TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
        if not ds.get("SliceThickness") and step is not None:  # Type 1 in the SEG's pixel measures
            ds.SliceThickness = step
    return headers


def slice_step_mm(sources: Sequence[Dataset]) -> float | None:
    """The step between the source slices along their normal, as the volume loader measures it
    (None: no usable stack): the SEG's slice thickness where the sources do not state one."""
    try:
        return round(stack_geometry([h for ds in sources for h in slice_headers(ds)]).slice_spacing_mm, 4)
    except VolumeError:
        return None


@dataclass(frozen=True)
class Placement:
    """Where an object goes among the study's exports: its instance number in the study's series
    of its kind, and (SR only) the earlier report it amends."""

    study_uid: str
    instance_number: int = 1
    predecessor_sr_uid: str | None = None


def placement(session: Session, row: Export, study_uid: str) -> Placement:
    """Derived from the study's earlier rows of the same kind, so a retry rebuilds the same object:
    the instance number counts those not superseded (sent, failed or still pending; their states no
    longer change once a newer result exists), the predecessor is the last SR actually sent."""
    earlier = (Export.study_id == row.study_id, Export.kind == row.kind, Export.id < row.id)
    count = session.execute(select(func.count(Export.id)).where(
        *earlier, Export.state != ExportState.superseded.value)).scalar_one()
    predecessor = None
    if row.kind == ExportKind.sr.value:
        predecessor = session.execute(
            select(Export.sop_instance_uid).where(*earlier, Export.state == ExportState.sent.value)
            .order_by(Export.id.desc()).limit(1)).scalar_one_or_none()
    return Placement(study_uid, count + 1, predecessor)


def build_dataset(kind: ExportKind, sop_instance_uid: str, result: Result, sources: Sequence[Dataset],
                  storage_root: Path, segmentation_uid: str | None, where: Placement | None = None) -> Dataset:
    """One object of ``result``. ``segmentation_uid``: the SEG the SR references (None: none).
    ``where``: its series, number and predecessor among the study's exports (None: a series of its own)."""
    # The writers pull in highdicom and the pipeline: imported where objects are built only.
    import numpy as np
    from PIL import Image

    from worker.derived import load_masks
    from worker.export_common import ExportScores, NewInstance, Predecessor, study_series_uid
    from worker.export_sc import projection_capture
    from worker.export_seg import lung_segmentation
    from worker.export_sr import measurement_report

    scores = ExportScores.of(result)
    study_uid = where.study_uid if where is not None else ""
    new = NewInstance(kind, sop_instance_uid, study_uid, where.instance_number if where is not None else 1)
    files = (result.details or {}).get("files") or {}
    if kind is ExportKind.sr:
        seg = NewInstance(ExportKind.seg, segmentation_uid, study_uid) if segmentation_uid else None
        before = where.predecessor_sr_uid if where is not None else None
        predecessor = None if before is None else Predecessor(
            study_uid, study_series_uid(study_uid, ExportKind.sr), Comprehensive3DSRStorage, before)
        return measurement_report(sources, scores, new, seg, predecessor)
    masks = load_masks(storage_root / files["masks"]) if files.get("masks") else None
    if kind is ExportKind.seg:
        if masks is None:
            raise ValueError("no masks were saved for this result")
        return lung_segmentation(sources, masks, scores, new)
    with Image.open(storage_root / files["projection"]) as picture:
        rgb = np.asarray(picture.convert("RGB"))
    return projection_capture(sources[0], rgb, scores, new, masks.spacing[2] if masks is not None else None)


# --- sending ------------------------------------------------------------------------------------


def _status_error(status: int) -> str | None:
    """None for success (warnings included: the object was stored), else what went wrong."""
    if status == 0x0000 or 0xB000 <= status <= 0xBFFF:
        return None
    return "no C-STORE answer" if status < 0 else f"C-STORE status 0x{status:04X}"


def _source_paths(session: Session, result: Result) -> list[Path]:
    """The scored series' instances in the result's own study: a series UID reused by another
    study (a faulty converter or anonymiser) must not lend its patient to these objects."""
    rows = session.execute(
        select(Instance.path).join(Series, Series.id == Instance.series_id)
        .where(Series.series_uid == result.series_uid, Instance.study_id == result.study_id).order_by(Instance.id)
    ).scalars().all()
    return [Path(p) for p in rows]


def check_one_patient(sources: Sequence[Dataset], study_uid: str) -> None:
    """The objects copy the patient and study from the sources: refuse to send any unless every
    source names the scored study and one patient, or a result could be filed under another one."""
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in sources}
    patients = {str(ds.get("PatientID", "")) for ds in sources}
    if studies != {study_uid}:
        raise ValueError(f"the source instances belong to {len(studies)} studies, not only to the scored one")
    if len(patients) != 1:
        raise ValueError(f"the source instances name {len(patients)} different patients")


def run_export(result_id: int, session_factory: sessionmaker[Session], settings: Settings,
               send: Send = push_datasets) -> ExportRun:
    """Build and send the pending objects of ``result_id``; record each one's outcome."""
    now = utcnow()
    with session_factory() as session:
        result = session.get(Result, result_id)
        rows = session.execute(select(Export).where(Export.result_id == result_id)).scalars().all()
        paths = _source_paths(session, result) if result is not None else []
        study_uid = session.get_one(Study, result.study_id).study_uid if result is not None else ""
        waiting = [r for r in rows if r.state == ExportState.pending.value]
        held = [r for r in waiting if r.next_attempt_at is not None and r.next_attempt_at > now + DUE_TOLERANCE]
        pending = sorted((r for r in waiting if r not in held), key=lambda r: BUILD_ORDER.index(ExportKind(r.kind)))
        places = {r.id: placement(session, r, study_uid) for r in pending}
    attempt = _Attempt(places=places)
    sources = _sources(attempt, pending, result, paths, study_uid) if result is not None and pending else None
    if result is not None and sources is not None:
        # The SEG goes first, on its own: the SR references it only once the node has stored it.
        seg = next((r for r in rows if r.kind == ExportKind.seg.value), None)
        first = [r for r in pending if r.kind == ExportKind.seg.value]
        _build(attempt, first, result, sources, settings.storage_root, None)
        _send(attempt, [r.id for r in first], settings, send)
        seg_stored = seg is not None and (seg.state == ExportState.sent.value
                                          or (seg.id in attempt.built and seg.id not in attempt.errors))
        rest = [r for r in pending if r.kind != ExportKind.seg.value]
        seg_uid = seg.sop_instance_uid if seg is not None and seg_stored else None
        _build(attempt, rest, result, sources, settings.storage_root, seg_uid)
        _send(attempt, [r.id for r in rest], settings, send)
    run = _record(session_factory, settings, result_id, [r.id for r in pending], attempt)
    if not held:
        return run
    # Held back (export_hold_seconds): come back when the first is due; a newer scoring may supersede them.
    due_in = min((r.next_attempt_at - now).total_seconds() for r in held if r.next_attempt_at is not None)
    return replace(run, pending=run.pending + len(held),
                               retry_in=due_in if run.retry_in is None else min(run.retry_in, due_in))


@dataclass
class _Attempt:
    """One run's objects and outcomes, by export id."""

    built: dict[int, Dataset] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)  # why it failed this time
    final: set[int] = field(default_factory=set)  # failures no retry can mend (cannot be built)
    warnings: dict[int, str] = field(default_factory=dict)  # stored, with a warning status
    places: dict[int, Placement] = field(default_factory=dict)  # series number and predecessor


def _sources(attempt: _Attempt, pending: list[Export], result: Result, paths: list[Path],
             study_uid: str) -> list[Dataset] | None:
    """The source headers, or None with every pending object failed for good (why is recorded)."""
    try:
        if not paths:
            raise ValueError(f"no instances of the scored series {result.series_uid} are recorded")
        sources = read_headers(paths)
        check_one_patient(sources, study_uid)
    except Exception as exc:  # gone (retention), unreadable, mixed: no retry brings them back
        for row in pending:
            attempt.errors[row.id] = f"cannot read the source instances: {exc}"
            attempt.final.add(row.id)
        return None
    return sources


def _build(attempt: _Attempt, rows: list[Export], result: Result, sources: list[Dataset], storage_root: Path,
           segmentation_uid: str | None) -> None:
    for row in rows:
        try:
            attempt.built[row.id] = build_dataset(ExportKind(row.kind), row.sop_instance_uid, result, sources,
                                                  storage_root, segmentation_uid, attempt.places.get(row.id))
        except Exception as exc:  # a bug or unusable masks: fail visibly, keep the others going
            log.exception("could not build an export", extra={"export_id": row.id, "kind": row.kind})
            attempt.errors[row.id] = f"could not build the {row.kind.upper()}: {type(exc).__name__}: {exc}"
            attempt.final.add(row.id)


def _send(attempt: _Attempt, export_ids: list[int], settings: Settings, send: Send) -> None:
    """Send those of ``export_ids`` that were built, over one association."""
    ids = [export_id for export_id in export_ids if export_id in attempt.built]
    if not ids:
        return
    try:
        statuses = send([attempt.built[export_id] for export_id in ids], host=settings.export_host,
                        port=settings.export_port, called_aet=settings.export_ae_title,
                        calling_aet=settings.export_calling_aet, timeout=settings.export_timeout_seconds)
    except Exception as exc:  # unreachable, refused, aborted: all of them wait for the next try
        for export_id in ids:
            attempt.errors[export_id] = f"{type(exc).__name__}: {exc}"
        return
    for export_id, status in zip(ids, statuses, strict=True):
        if status == NOT_ACCEPTED:  # the node does not take this kind of object: no retry changes that
            kind = attempt.built[export_id].SOPClassUID.name
            attempt.errors[export_id] = f"the node accepted no presentation context for {kind}"
            attempt.final.add(export_id)
            continue
        problem = _status_error(status)
        if problem:
            attempt.errors[export_id] = problem
        elif status:
            attempt.warnings[export_id] = f"stored with warning status 0x{status:04X}"


def _record(session_factory: sessionmaker[Session], settings: Settings, result_id: int, attempted: list[int],
            attempt: _Attempt) -> ExportRun:
    now = utcnow()
    counts = {state: 0 for state in ExportState}
    retry_in: float | None = None
    with session_factory.begin() as session:
        for export_id in attempted:
            row = session.get(Export, export_id)
            if (row is not None and row.state == ExportState.superseded.value and export_id in attempt.built
                    and export_id not in attempt.errors):  # a newer scoring came while it was on its way
                row.attempts += 1
                row.state, row.sent_at, row.last_error = ExportState.sent.value, now, attempt.warnings.get(export_id)
                counts[ExportState.sent] += 1
                continue
            if row is None or row.state != ExportState.pending.value:
                continue  # an admin or another delivery got there first
            row.attempts += 1
            error = attempt.errors.get(export_id)
            row.next_attempt_at = None
            if error is None:
                row.state, row.sent_at, row.last_error = ExportState.sent.value, now, attempt.warnings.get(export_id)
            else:
                row.last_error = error[:2000]
                if export_id in attempt.final or row.attempts >= settings.export_max_attempts:
                    row.state = ExportState.failed.value
                else:
                    wait = backoff_seconds(row.attempts, settings)
                    row.next_attempt_at = now + timedelta(seconds=wait)
                    retry_in = wait if retry_in is None else min(retry_in, wait)
            counts[ExportState(row.state)] += 1
    if attempted:
        log.info("export attempt", extra={"result_id": result_id, "sent": counts[ExportState.sent],
                                          "failed": counts[ExportState.failed],
                                          "pending": counts[ExportState.pending]})
    return ExportRun(result_id, counts[ExportState.sent], counts[ExportState.failed], counts[ExportState.pending],
                     retry_in)
