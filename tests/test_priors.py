"""Comparison with the patient's prior study (app.priors): phantoms of one patient scored through
the worker's own path, the trend and the worsening rule, and the patient's studies over HTTP."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import highdicom as hd
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from app.api.main import create_app
from app.db.models import Export, ExportKind, Instance, Job, PriorLookup, Result, Series, Study, utcnow
from app.db.session import make_engine
from app.lifecycle import queue_settled_studies
from app.priors import trend
from app.security import Role, create_api_key
from app.settings import Settings
from models.phantom import PhantomSpec, phantom_volume
from models.phantom_dicom import phantom_datasets
from models.priority import WORSENING_BONUS, priority_score
from tests.conftest import store_study_files, write_phantom_study
from worker.export_common import LESION_VOLUME_CHANGE, SEVERITY_CHANGE, TIME_SINCE_PRIOR, ExportScores, NewInstance
from worker.export_sr import measurement_report
from worker.jobs import run_job

DCIODVFY = Path("/usr/bin/dciodvfy")

#: Small but scorable (324 mm of coverage): a scoring takes a second or two on one core.
TINY = {"slices": 36, "rows": 96, "columns": 96, "pixel_spacing": 3.6, "slice_spacing": 9.0}
PATIENT = "PRIOR-001"


@pytest.fixture(params=["sqlite", "postgresql"])
def factory(request: pytest.FixtureRequest, sqlite_settings: Settings) -> Iterator[sessionmaker[Session]]:
    """The database on SQLite or on PostgreSQL (its database shared by the run: emptied around)."""
    url = sqlite_settings.sqlalchemy_url if request.param == "sqlite" else request.getfixturevalue("pg_url")
    engine = make_engine(url)
    made = sessionmaker(engine, expire_on_commit=False)

    def empty() -> None:
        with made.begin() as session:
            for model in (PriorLookup, Export, Result, Job, Instance, Series, Study):
                session.execute(delete(model))

    empty()
    yield made
    empty()
    engine.dispose()


def patient_study(folder: Path, severity: float, seed: int, *, study_date: str, birth_date: str = "19600301",
                  patient_id: str = PATIENT) -> dict[str, Any]:
    """A phantom of ``patient_id`` dated ``study_date`` whose worse (left) lung has ``severity`` %."""
    truth = write_phantom_study(folder, severity_left=severity, severity_right=5.0, seed=seed, **TINY)
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.PatientBirthDate, ds.PatientSex, ds.StudyDate = patient_id, birth_date, "F", study_date
        ds.IssuerOfPatientID = "HOSPITAL-A"
        ds.save_as(path, enforce_file_format=True)
    return truth


def score(settings: Settings, factory: sessionmaker[Session], folder: Path) -> None:
    """Receive and score the study in ``folder`` as the service does (without the broker)."""
    store_study_files(settings, factory, folder)
    jobs = queue_settled_studies(factory, 0.0, now=utcnow() + timedelta(seconds=5))
    assert jobs
    for job_id in jobs:
        outcome = run_job(job_id, factory, settings, worker="test", export=None)
        assert outcome.status == "scored", outcome.reason


def study_row(factory: sessionmaker[Session], study_uid: str) -> Study:
    with factory() as session:
        return session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one()


def newest_result(factory: sessionmaker[Session], study_uid: str) -> Result:
    with factory() as session:
        return session.execute(select(Result).join(Study).where(Study.study_uid == study_uid)
                               .order_by(Result.id.desc()).limit(1)).scalar_one()


def test_trend_thresholds() -> None:
    assert trend(None, 5.0) is None
    assert trend(5.0, 5.0) == "worse" and trend(-5.0, 5.0) == "better" and trend(4.9, 5.0) == "unchanged"


def test_worsening_bonus_stays_within_the_band() -> None:
    top_of_band = priority_score(49.9, 1.0, worsening=True)
    assert priority_score(25.0, 0.0, worsening=True) > priority_score(49.9, 1.0)
    assert top_of_band < priority_score(50.0, 0.0)
    assert priority_score(30.0, 0.5, worsening=True) - priority_score(30.0, 0.5) == WORSENING_BONUS


def test_follow_up_is_compared_with_the_prior_and_another_person_is_not(
    tmp_path: Path, sqlite_settings: Settings, factory: sessionmaker[Session]
) -> None:
    first = patient_study(tmp_path / "first", 10.0, 31, study_date="20240110")
    score(sqlite_settings, factory, tmp_path / "first")
    before = study_row(factory, first["study_instance_uid"])
    assert before.prior_study_uid is None and before.prior_reason == "no earlier study of this patient scored"

    second = patient_study(tmp_path / "second", 30.0, 32, study_date="20240117")
    score(sqlite_settings, factory, tmp_path / "second")
    row = study_row(factory, second["study_instance_uid"])
    result = newest_result(factory, second["study_instance_uid"])
    assert row.prior_study_uid == result.prior_study_uid == first["study_instance_uid"]
    assert row.prior_study_date == "20240110" and row.prior_days == result.prior_days == 7
    assert row.prior_reason is None
    assert row.severity_change == pytest.approx(20.0, abs=3.0)
    assert result.severity_left_change == pytest.approx(20.0, abs=3.0)
    assert result.severity_right_change == pytest.approx(0.0, abs=2.0)
    assert result.lesion_volume_change_ml is not None and result.lesion_volume_change_ml > 0
    assert trend(row.severity_change, sqlite_settings.trend_points) == "worse"
    # worse than at the prior: first within its band (CT-2), by the bonus
    assert row.severity_band == 2 and row.priority is not None
    assert row.severity is not None
    assert row.priority == pytest.approx(priority_score(row.severity, None, worsening=True))
    # scoring the later study left the earlier one as it was
    after = study_row(factory, first["study_instance_uid"])
    assert (after.prior_study_uid, after.prior_reason, after.priority) == (None, before.prior_reason, before.priority)

    other = patient_study(tmp_path / "other", 20.0, 33, study_date="20240120", birth_date="19851224")
    score(sqlite_settings, factory, tmp_path / "other")
    unmatched = study_row(factory, other["study_instance_uid"])
    assert unmatched.prior_study_uid is None and unmatched.severity_change is None
    assert unmatched.prior_reason == "same patient ID, different birth date"
    assert newest_result(factory, other["study_instance_uid"]).prior_reason == unmatched.prior_reason


def test_a_prior_scored_late_fills_in_the_comparison(
    tmp_path: Path, sqlite_settings: Settings, sqlite_factory: sessionmaker[Session]
) -> None:
    settings = sqlite_settings.model_copy(update={"priority_worsening_first": False})
    new = patient_study(tmp_path / "new", 10.0, 34, study_date="20240301")
    score(settings, sqlite_factory, tmp_path / "new")
    assert study_row(sqlite_factory, new["study_instance_uid"]).prior_study_uid is None
    old = patient_study(tmp_path / "old", 30.0, 35, study_date="20240220")  # retrieved late
    score(settings, sqlite_factory, tmp_path / "old")
    row = study_row(sqlite_factory, new["study_instance_uid"])
    assert row.prior_study_uid == old["study_instance_uid"] and row.prior_days == 10
    assert row.severity_change == pytest.approx(-20.0, abs=3.0)
    assert trend(row.severity_change, settings.trend_points) == "better"
    assert row.severity is not None
    assert row.priority == pytest.approx(priority_score(row.severity, None))


def test_api_worklist_patient_studies_and_csv_carry_the_comparison(
    tmp_path: Path, sqlite_settings: Settings, sqlite_factory: sessionmaker[Session]
) -> None:
    first = patient_study(tmp_path / "first", 10.0, 36, study_date="20240110")
    second = patient_study(tmp_path / "second", 30.0, 37, study_date="20240112")
    for folder in ("first", "second"):
        score(sqlite_settings, sqlite_factory, tmp_path / folder)
    with sqlite_factory.begin() as session:
        reader = {"X-API-Key": create_api_key(session, "reader", Role.radiologist)}
        admin = {"X-API-Key": create_api_key(session, "boss", Role.admin)}
    client = TestClient(create_app(sqlite_settings, sqlite_factory, None))

    items = {i["study_uid"]: i for i in client.get("/api/worklist", headers=reader).json()["items"]}
    new, old = items[second["study_instance_uid"]], items[first["study_instance_uid"]]
    assert (new["trend"], new["prior_study_uid"], new["prior_days"]) == ("worse", first["study_instance_uid"], 2)
    assert new["severity_change"] == pytest.approx(20.0, abs=3.0)
    assert (old["trend"], old["prior_reason"]) == (None, "no earlier study of this patient scored")

    detail = client.get(f"/api/studies/{second['study_instance_uid']}", headers=reader).json()
    assert detail["trend"] == "worse" and detail["results"][-1]["prior_study_uid"] == first["study_instance_uid"]
    assert detail["results"][-1]["lesion_volume_change_ml"] > 0

    assert client.get(f"/api/patients/{PATIENT}/studies").status_code == 401
    history = client.get(f"/api/patients/{PATIENT}/studies", headers=reader).json()
    assert history["patient_id"] == PATIENT
    assert [s["study_uid"] for s in history["studies"]] == [first["study_instance_uid"], second["study_instance_uid"]]
    assert [s["trend"] for s in history["studies"]] == [None, "worse"]
    assert history["studies"][1]["severity"] - history["studies"][0]["severity"] == pytest.approx(
        history["studies"][1]["severity_change"], abs=0.01)
    assert client.get("/api/patients/NOBODY/studies", headers=reader).status_code == 404

    csv_text = client.get("/api/admin/export.csv", headers=admin).text
    header, *lines = csv_text.splitlines()
    assert "prior_study_uid" in header.split(",") and "lesion_volume_change_ml" in header.split(",")
    [line] = [line for line in lines if line.startswith(second["study_instance_uid"])]
    assert first["study_instance_uid"] in line


def test_sr_carries_the_comparison(tmp_path: Path) -> None:
    """The SR of a scoring with a prior: the prior's Study Instance UID and every change, valid
    for dciodvfy; one without a prior has no comparison group."""
    spec = PhantomSpec(severity_left=30.0, severity_right=5.0, seed=38, **TINY)  # type: ignore[arg-type]
    sources = phantom_datasets(phantom_volume(spec), spec)
    result = SimpleNamespace(
        series_uid=str(sources[0].SeriesInstanceUID), method="threshold", model_version="threshold-2.0",
        identification=None, details={}, severity=30.0, severity_left=30.0, severity_right=5.0,
        lung_volume_left_ml=2000.0, lung_volume_right_ml=2200.0, lesion_volume_left_ml=600.0,
        lesion_volume_right_ml=110.0, prior_study_uid="1.2.826.0.1.3680043.8.498.1", prior_days=7,
        severity_change=20.1, severity_left_change=20.1, severity_right_change=-0.2, lesion_volume_change_ml=367.5)
    sr = measurement_report(sources, ExportScores.of(result), NewInstance(ExportKind.sr, str(generate_uid())))
    [uid] = hd.sr.utils.find_content_items(sr, name=codes.DCM.StudyInstanceUID, recursive=True)
    assert uid.UID == "1.2.826.0.1.3680043.8.498.1"
    changes = {}
    for item in hd.sr.utils.find_content_items(sr, value_type=hd.sr.ValueTypeValues.NUM, recursive=True):
        concept = item.ConceptNameCodeSequence[0].CodeValue
        sides = [c.ConceptCodeSequence[0].CodeMeaning
                 for c in (hd.sr.utils.find_content_items(item, name=codes.SCT.Laterality, recursive=True)
                           if "ContentSequence" in item else [])]
        changes[(concept, *sides)] = float(item.MeasuredValueSequence[0].NumericValue)
    assert changes[(SEVERITY_CHANGE.value,)] == pytest.approx(20.1)
    assert changes[(SEVERITY_CHANGE.value, "Right")] == pytest.approx(-0.2)
    assert changes[(SEVERITY_CHANGE.value, "Left")] == pytest.approx(20.1)
    assert changes[(LESION_VOLUME_CHANGE.value,)] == pytest.approx(367.5)
    assert changes[(TIME_SINCE_PRIOR.value,)] == 7
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    if DCIODVFY.exists():
        run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
        assert [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")] == []

    alone = measurement_report(sources, ExportScores.of(SimpleNamespace(**{**vars(result), "prior_study_uid": None})),
                               NewInstance(ExportKind.sr, str(generate_uid())))
    assert hd.sr.utils.find_content_items(alone, name=codes.DCM.StudyInstanceUID, recursive=True) == []
    assert hd.sr.utils.find_content_items(alone, name=TIME_SINCE_PRIOR, recursive=True) == []
