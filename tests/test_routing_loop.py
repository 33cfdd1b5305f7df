"""A PACS rule "forward on change" sends the whole study back, our own SR, SEG and secondary
capture with it. Before, each of ours reopened the study, the same CT was scored again and three
more objects went out: a loop without end. Now our objects never reopen a study, and a scoring of
the very same instances reuses the latest result and sends nothing (an admin's rescore still
recomputes)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Export, ExportState, Instance, Job, Result, Series, Study, StudyState, utcnow
from app.db.session import make_engine
from app.dicom.listener import start_listener
from app.dicom.push import push_datasets
from app.lifecycle import queue_settled_studies, request_rescore
from app.settings import Settings
from tests.conftest import store_study_files, write_phantom_study
from tests.test_exports import DCIODVFY, dciodvfy_errors
from worker.exports import run_export
from worker.jobs import INSTANCES_SHA256, REUSED_RESULT_ID, run_job

pytestmark = pytest.mark.timeout(600)

SPEC = {"slices": 36, "rows": 96, "columns": 96, "pixel_spacing": 3.6, "slice_spacing": 9.0}
PACS_AET = "PACS"


@dataclass
class Backend:
    settings: Settings
    factory: sessionmaker[Session]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, sqlite_settings: Settings) -> Iterator[Backend]:
    """Settings that export to a PACS, on SQLite or on PostgreSQL (its database shared by the run)."""
    url = sqlite_settings.sqlalchemy_url if request.param == "sqlite" else request.getfixturevalue("pg_url")
    engine = make_engine(url)
    factory = sessionmaker(engine, expire_on_commit=False)

    def empty() -> None:  # the PostgreSQL database holds other modules' rows: counts start from none
        with factory.begin() as session:
            for model in (Export, Result, Job, Instance, Series, Study):
                session.execute(delete(model))

    empty()
    yield Backend(sqlite_settings, factory)
    empty()
    engine.dispose()


class Pacs:
    """An in-process storage SCP that keeps every object it receives."""

    def __init__(self) -> None:
        self.received: list[Dataset] = []
        ae = AE(ae_title=PACS_AET)
        ae.supported_contexts = AllStoragePresentationContexts
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        assert server is not None  # block=False: the server runs in its own thread and is returned
        self.server = server
        self.port = int(self.server.server_address[1])

    def _store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return 0x0000


def exporting_to(pacs: Pacs, settings: Settings) -> Settings:
    """``settings`` with exports to the in-process PACS and a listener on the loopback address."""
    return settings.model_copy(update={
        "export_enabled": True, "export_host": "127.0.0.1", "export_port": pacs.port,
        "export_ae_title": PACS_AET, "export_timeout_seconds": 20, "dicom_host": "127.0.0.1"})


def settle_score_export(backend: Backend, settings: Settings) -> list[str]:
    """One round of the service: settle, score each queued job, send pending exports. Returns outcomes."""
    factory = backend.factory
    outcomes = []
    for job_id in queue_settled_studies(factory, 0.0, now=utcnow() + timedelta(seconds=5)):
        outcome = run_job(job_id, factory, settings, worker="test", export=None)
        outcomes.append(outcome.status)
    with factory() as session:
        pending = session.execute(select(Export.result_id).where(Export.state == ExportState.pending.value)
                                  .distinct()).scalars().all()
    for result_id in pending:
        run_export(result_id, factory, settings)
    return outcomes


def count(factory: sessionmaker[Session], model: Any) -> int:
    with factory() as session:
        return int(session.execute(select(func.count()).select_from(model)).scalar_one())


def test_forwarding_the_whole_study_back_three_times_scores_and_exports_once(backend: Backend,
                                                                             tmp_path: Path) -> None:
    pacs = Pacs()
    settings = exporting_to(pacs, backend.settings)
    listener = start_listener(settings, backend.factory)
    try:
        truth = write_phantom_study(tmp_path / "ct", severity_left=25.0, severity_right=5.0, seed=91, **SPEC)
        ct = [pydicom.dcmread(p) for p in sorted((tmp_path / "ct").glob("*.dcm"))]
        assert set(push_datasets(ct, host="127.0.0.1", port=settings.dicom_port, called_aet=settings.ae_title,
                                 calling_aet=PACS_AET)) == {0}
        assert settle_score_export(backend, settings) == ["scored"]
        assert len(pacs.received) == 3
        ours = list(pacs.received)
        for _ in range(3):  # the rule forwards the study, ours included, each time it changes
            statuses = push_datasets([*ct, *ours], host="127.0.0.1", port=settings.dicom_port,
                                     called_aet=settings.ae_title, calling_aet=PACS_AET)
            assert set(statuses) == {0}
            assert settle_score_export(backend, settings) == []
    finally:
        listener.shutdown()
        pacs.server.shutdown()
    assert count(backend.factory, Result) == 1
    assert count(backend.factory, Export) == 3 and len(pacs.received) == 3
    with backend.factory() as session:
        study = session.execute(select(Study).where(Study.study_uid == truth["study_instance_uid"])).scalar_one()
        assert (study.state, study.version) == (StudyState.scored.value, 1)
        assert study.instance_count == len(ct) + 3  # stored (CTTRIAGE_OWN_OBJECTS=store) and counted
        reasons = {s.modality: s.skip_reason for s in session.execute(select(Series)).scalars()
                   if s.series_uid != truth["series_instance_uid"]}
    assert reasons == {"SR": "created by cttriage (SR)", "SEG": "created by cttriage (SEG)",
                       "OT": "created by cttriage (SC)"}, reasons


def test_own_objects_can_be_dropped(backend: Backend, tmp_path: Path) -> None:
    pacs = Pacs()
    settings = backend.settings.model_copy(update={
        "export_enabled": True, "export_host": "127.0.0.1", "export_port": pacs.port,
        "export_ae_title": PACS_AET, "export_timeout_seconds": 20, "own_objects": "drop"})
    try:
        write_phantom_study(tmp_path / "ct", severity_left=10.0, severity_right=5.0, seed=92, **SPEC)
        store_study_files(settings, backend.factory, tmp_path / "ct")
        assert settle_score_export(backend, settings) == ["scored"]
    finally:
        pacs.server.shutdown()
    folder = tmp_path / "back"
    folder.mkdir()
    for i, ds in enumerate(pacs.received):
        ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)
    before = count(backend.factory, Instance)
    store_study_files(settings, backend.factory, folder)
    assert count(backend.factory, Instance) == before
    assert settle_score_export(backend, settings) == []


def test_same_instances_reuse_the_result_and_an_admin_rescore_recomputes(backend: Backend, tmp_path: Path) -> None:
    """A CT series that does not win the selection reopens the study (it might have), but the
    chosen series is the same, instance for instance: the result is reused, nothing is sent."""
    settings = backend.settings.model_copy(update={"export_enabled": True, "export_host": "127.0.0.1"})
    truth = write_phantom_study(tmp_path / "ct", severity_left=25.0, severity_right=5.0, seed=93, **SPEC)
    store_study_files(settings, backend.factory, tmp_path / "ct")
    [job1] = queue_settled_studies(backend.factory, 0.0, now=utcnow() + timedelta(seconds=5))
    assert run_job(job1, backend.factory, settings, worker="test").status == "scored"

    extra = tmp_path / "extra"  # a few slices of another CT series: too short to be chosen
    extra.mkdir()
    series_uid = str(generate_uid())
    for path in sorted((tmp_path / "ct").glob("*.dcm"))[:4]:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SeriesNumber = series_uid, str(generate_uid()), 7
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(extra / path.name, enforce_file_format=True)
    store_study_files(settings, backend.factory, extra)
    [job2] = queue_settled_studies(backend.factory, 0.0, now=utcnow() + timedelta(seconds=5))
    assert run_job(job2, backend.factory, settings, worker="test").status == "reused"
    with backend.factory() as session:
        first, second = session.execute(select(Result).order_by(Result.id)).scalars().all()
        study = session.execute(select(Study).where(Study.study_uid == truth["study_instance_uid"])).scalar_one()
        assert second.details[REUSED_RESULT_ID] == first.id
        assert second.details[INSTANCES_SHA256] == first.details[INSTANCES_SHA256]
        assert (second.severity, second.study_version) == (first.severity, 2)
        assert (study.state, study.version, study.severity) == (StudyState.scored.value, 2, first.severity)
        assert study.severity_band is not None and study.chosen_series_uid == truth["series_instance_uid"]
    assert count(backend.factory, Export) == 3  # the first result's only

    job3 = request_rescore(backend.factory, truth["study_instance_uid"])
    assert job3 is not None
    assert run_job(job3, backend.factory, settings, worker="test").status == "scored"
    assert count(backend.factory, Result) == 3 and count(backend.factory, Export) == 6


def test_a_study_sent_in_two_parts_leaves_one_current_report_that_amends_the_first(backend: Backend,
                                                                                  tmp_path: Path) -> None:
    """The first part (half the chest, already enough to score) is scored and exported; the rest
    arrives later, the study is scored again, and its report amends the first one in the same
    series, as does its SEG and secondary capture: the PACS shows one current report and its history."""
    pacs = Pacs()
    settings = exporting_to(pacs, backend.settings)
    listener = start_listener(settings, backend.factory)
    try:
        write_phantom_study(tmp_path / "ct", severity_left=25.0, severity_right=5.0, seed=94, **SPEC)
        ct = [pydicom.dcmread(p) for p in sorted((tmp_path / "ct").glob("*.dcm"))]
        ct.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
        half = len(ct) // 2
        for part in (ct[:half], ct[half:]):
            assert set(push_datasets(part, host="127.0.0.1", port=settings.dicom_port,
                                     called_aet=settings.ae_title, calling_aet=PACS_AET)) == {0}
            assert settle_score_export(backend, settings) == ["scored"]
    finally:
        listener.shutdown()
        pacs.server.shutdown()
    by_modality: dict[str, list[Dataset]] = {}
    for ds in pacs.received:
        by_modality.setdefault(str(ds.Modality), []).append(ds)
    assert sorted(by_modality) == ["OT", "SEG", "SR"] and all(len(v) == 2 for v in by_modality.values())
    for objects in by_modality.values():
        first, second = sorted(objects, key=lambda ds: int(ds.InstanceNumber))
        assert first.SeriesInstanceUID == second.SeriesInstanceUID, "one series per kind"
        assert int(second.InstanceNumber) > int(first.InstanceNumber)
    first_sr, second_sr = sorted(by_modality["SR"], key=lambda ds: int(ds.InstanceNumber))
    [study_ref] = second_sr.PredecessorDocumentsSequence
    [series_ref] = study_ref.ReferencedSeriesSequence
    [sop_ref] = series_ref.ReferencedSOPSequence
    assert sop_ref.ReferencedSOPInstanceUID == first_sr.SOPInstanceUID
    assert series_ref.SeriesInstanceUID == first_sr.SeriesInstanceUID
    assert "PredecessorDocumentsSequence" not in first_sr
    if DCIODVFY.exists():
        for name, ds in (("first", first_sr), ("second", second_sr)):
            ds.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
            assert dciodvfy_errors(tmp_path / f"{name}.dcm") == [], name
