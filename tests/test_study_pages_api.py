"""The API behind the worklist and study pages (issue 11): patient name/ID, modality and the viewer
link for radiologists, the patient ID filter, the reason code of a rejected study, and series
decisions recorded before a study is rejected. SQLite, in process (no service, no browser)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.api.main import create_app
from app.db.migrate import upgrade_to_head
from app.db.models import Series, Study, StudyState
from app.db.session import make_engine
from app.ingest import describe_instance
from app.security import Role, create_api_key
from app.series_selection import SeriesCriteria, SeriesSelection
from app.settings import Settings
from models.dicom_headers import SliceHeader
from models.errors import NoUsableSeriesError
from models.phantom import PhantomSpec
from models.phantom_dicom import write_phantom
from models.predictor import ThresholdPredictor
from worker.pipeline import score_study

VIEWER = "https://pacs.example/ohif/viewer?StudyInstanceUIDs={study_uid}&accession={accession}"


@dataclass
class Api:
    client: TestClient
    factory: sessionmaker[Session]
    admin: dict[str, str]
    reader: dict[str, str]


def _api(tmp_path: Path, **settings: str) -> Api:
    settings_ = Settings(data_dir=tmp_path, min_free_bytes=0, **settings)  # type: ignore[arg-type]
    settings_.storage_root.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings_.sqlalchemy_url)
    factory = sessionmaker(make_engine(settings_.sqlalchemy_url), expire_on_commit=False)
    with factory.begin() as session:
        admin = create_api_key(session, "boss", Role.admin)
        reader = create_api_key(session, "reader", Role.radiologist)
        rejected = Study(study_uid="1.2.1", accession_number=None, study_date="20260102",
                         state=StudyState.rejected.value, patient_name="DOE^JANE", patient_id="PID-7",
                         reason="no usable series: #2 (1 slice)",
                         reason_code="NoUsableSeriesError")
        other = Study(study_uid="1.2.2", accession_number="A&B 1", state=StudyState.queued.value,
                      patient_name="ROE^RICHARD", patient_id="PID-8")
        session.add_all([rejected, other])
        session.flush()
        session.add_all([Series(study_id=rejected.id, series_uid="1.2.1.1", modality="CT", instance_count=1,
                                skip_reason="1 slice"),
                         Series(study_id=rejected.id, series_uid="1.2.1.2", modality="SEG", instance_count=1),
                         Series(study_id=other.id, series_uid="1.2.2.1", modality="CT", instance_count=3)])
    return Api(TestClient(create_app(settings_, factory, None)), factory,
               {"Authorization": f"Bearer {admin}"}, {"X-API-Key": reader})


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield _api(tmp_path, viewer_url_template=VIEWER)


def test_worklist_shows_patient_fields_modality_and_viewer_link(api: Api) -> None:
    items = {i["study_uid"]: i for i in api.client.get("/api/worklist", headers=api.reader).json()["items"]}
    rejected, other = items["1.2.1"], items["1.2.2"]
    assert (rejected["patient_name"], rejected["patient_id"], rejected["study_date"]) == ("DOE^JANE", "PID-7",
                                                                                         "20260102")
    assert rejected["modality"] == "CT/SEG" and other["modality"] == "CT"
    assert rejected["reason_code"] == "NoUsableSeriesError"
    # placeholders URL-encoded; no accession: an empty value
    assert other["viewer_url"] == "https://pacs.example/ohif/viewer?StudyInstanceUIDs=1.2.2&accession=A%26B%201"
    assert rejected["viewer_url"] == "https://pacs.example/ohif/viewer?StudyInstanceUIDs=1.2.1&accession="


def test_worklist_filters_by_patient_id(api: Api) -> None:
    found = api.client.get("/api/worklist", params={"patient_id": "PID-8"}, headers=api.reader).json()
    assert found["total"] == 1 and [i["study_uid"] for i in found["items"]] == ["1.2.2"]
    assert api.client.get("/api/worklist", params={"patient_id": "nobody"}, headers=api.reader).json()["total"] == 0
    # a value that is not valid is refused without being quoted back
    bad = api.client.get("/api/worklist", params={"patient_id": "SECRET-" + "9" * 70}, headers=api.reader)
    assert bad.status_code == 422 and "SECRET" not in bad.text


def test_study_detail_has_reason_code_patient_fields_and_link(api: Api) -> None:
    study = api.client.get("/api/studies/1.2.1", headers=api.reader).json()
    assert study["reason_code"] == "NoUsableSeriesError" and study["reason"].startswith("no usable series")
    assert (study["patient_name"], study["patient_id"], study["modality"]) == ("DOE^JANE", "PID-7", "CT/SEG")
    assert study["viewer_url"].startswith("https://pacs.example/ohif/viewer?StudyInstanceUIDs=1.2.1")
    assert {s["series_uid"]: s["skip_reason"] for s in study["series"]}["1.2.1.1"] == "1 slice"
    assert api.client.get("/api/studies/1.2.1").status_code == 401  # no key, no patient data


def test_no_viewer_link_without_a_template(tmp_path: Path) -> None:
    api = _api(tmp_path)
    assert api.client.get("/api/studies/1.2.2", headers=api.reader).json()["viewer_url"] is None


def test_ingest_records_patient_name_and_id_and_logs_neither(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    api = _api(tmp_path / "api")
    folder = tmp_path / "phantom"
    truth = write_phantom(folder, PhantomSpec(slices=4, rows=32, columns=32, seed=3), accession="ACC-P",
                          patient_id="PAT-0042", patient_name="SMITH^ANNA")
    files = sorted(folder.glob("*.dcm"))
    with caplog.at_level(logging.DEBUG):
        report = api.client.post("/api/studies", headers=api.admin,
                                 files=[("files", (f.name, f.read_bytes(), "application/dicom")) for f in files])
        assert report.status_code == 202, report.text
        study = api.client.get(f"/api/studies/{truth['study_instance_uid']}", headers=api.reader).json()
    assert (study["patient_name"], study["patient_id"]) == ("SMITH^ANNA", "PAT-0042")
    assert "PAT-0042" not in caplog.text and "SMITH" not in caplog.text


def test_series_decisions_are_recorded_before_a_rejection(tmp_path: Path) -> None:
    write_phantom(tmp_path, PhantomSpec(slices=4, rows=32, columns=32, seed=4))
    path = sorted(tmp_path.glob("*.dcm"))[0]  # one slice: no usable series
    ds = pydicom.dcmread(io.BytesIO(path.read_bytes()))
    slices = [SliceHeader.from_dict(h) for h in describe_instance(ds, str(ds.file_meta.TransferSyntaxUID)).headers]
    seen: list[SeriesSelection] = []
    with pytest.raises(NoUsableSeriesError) as raised:
        score_study(slices, {}, ThresholdPredictor(2.0), criteria=SeriesCriteria(), on_selection=seen.append)
    assert len(seen) == 1 and seen[0].chosen is None
    [decision] = seen[0].decisions
    assert not decision.chosen and decision.reason and decision.reason in str(raised.value)
