"""Priors from the PACS: Orthanc (the Debian package) holds a prior cttriage never received; a new
study of the patient arrives, cttriage finds the prior (C-FIND), has it sent (C-MOVE), scores it,
and the new study's row shows the comparison. With Orthanc stopped, a new study is still scored
and its lookup is listed as failed with the reason."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pydicom
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app import prior_lookups
from app.db.models import PriorLookup, Study
from app.dicom.push import push_files
from app.dicom.query_retrieve import FoundStudy
from app.prior_lookups import look_up_one, request_lookup
from app.priority import NORMAL, RETRIEVED_PRIOR, queue_priority
from app.settings import Settings
from models.phantom import PhantomSpec
from models.phantom_dicom import write_phantom
from tests import test_browser
from tests.conftest import dcmtk_storescu, free_port
from tests.service_process import API, embedded_service, wait_for_state, wait_until
from tests.test_browser import new_page, sign_in
from tests.test_end_to_end import SMALL, study_files

#: Headless Chromium (tests/test_browser.py's), for the admin page.
browser = test_browser.browser
ORTHANC = Path("/usr/sbin/Orthanc")
ORTHANC_AET = "ORTHANC"


def write_visit(folder: Path, patient_id: str, severity_left: float, seed: int, study_date: str) -> dict[str, Any]:
    # SMALL is a plain dict[str, float] (tests.test_end_to_end): its keys are PhantomSpec's geometry fields.
    geometry = cast(dict[str, Any], SMALL)
    truth = write_phantom(folder, PhantomSpec(severity_left=severity_left, severity_right=4.0, seed=seed, **geometry),
                          accession=f"ACC{seed}", patient_id=patient_id)
    for path in study_files(folder):
        ds = pydicom.dcmread(path)
        ds.StudyDate = study_date
        ds.save_as(path, enforce_file_format=True)
    return truth


class Orthanc:
    """An Orthanc of its own (storage, ports) that knows cttriage as a C-MOVE destination."""

    def __init__(self, root: Path, cttriage_port: int) -> None:
        self.http_port, self.dicom_port = free_port(), free_port()
        root.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "TESTPACS", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": ORTHANC_AET,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
            "DicomModalities": {"cttriage": ["CTTRIAGE", "127.0.0.1", cttriage_port]},
        }
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps(config))
        self.log = (root / "orthanc.log").open("ab")
        self.proc = subprocess.Popen([str(ORTHANC), str(self.config)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{self.http_port}/system", timeout=2).status_code == 200,
                   60, "Orthanc")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.log.close()


@pytest.fixture
def orthanc_and_port(tmp_path: Path) -> Iterator[tuple[Orthanc, int]]:
    if not ORTHANC.exists():  # pragma: no cover - environment
        pytest.fail("Orthanc is required: apt-get install -y orthanc")
    cttriage_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", cttriage_port)
    try:
        yield orthanc, cttriage_port
    finally:
        orthanc.stop()


def lookup_of(api: str, study_uid: str, states: tuple[str, ...]) -> dict[str, Any] | None:
    items = API.get(f"{api}/api/admin/prior-lookups").json()["items"]
    return next((i for i in items if i["study_uid"] == study_uid and i["state"] in states), None)


def test_retrieved_priors_wait_behind_new_studies() -> None:
    assert queue_priority("settled", None, retrieved_prior=True) == RETRIEVED_PRIOR > NORMAL
    assert queue_priority("settled", 4, retrieved_prior=True) == RETRIEVED_PRIOR


def test_prior_is_found_retrieved_scored_and_compared(orthanc_and_port: tuple[Orthanc, int], browser: Any,
                                                      tmp_path: Path) -> None:
    orthanc, port = orthanc_and_port
    prior = write_visit(tmp_path / "prior", "PACS-PRIOR-1", 10.0, 51, "20240110")
    stored = dcmtk_storescu(study_files(tmp_path / "prior"), orthanc.dicom_port, called_aet=ORTHANC_AET)
    assert stored.returncode == 0, stored.stderr
    (tmp_path / "cttriage").mkdir()
    with embedded_service(tmp_path / "cttriage", CTTRIAGE_DICOM_PORT=str(port), CTTRIAGE_SETTLE_SECONDS="3",
                          CTTRIAGE_ASSEMBLER_INTERVAL_SECONDS="0.5", CTTRIAGE_PRIORS_ENABLED="true",
                          CTTRIAGE_PRIORS_HOST="127.0.0.1", CTTRIAGE_PRIORS_PORT=str(orthanc.dicom_port),
                          CTTRIAGE_PRIORS_AE_TITLE=ORTHANC_AET, CTTRIAGE_PRIORS_INTERVAL_SECONDS="0.5",
                          CTTRIAGE_PRIORS_TIMEOUT_SECONDS="10") as service:
        logs = service.process.log
        assert API.get(f"{service.api}/api/studies/{prior['study_instance_uid']}").status_code == 404  # never seen

        new = write_visit(tmp_path / "new", "PACS-PRIOR-1", 30.0, 52, "20240117")
        assert set(push_files(study_files(tmp_path / "new"), host="127.0.0.1", port=port)) == {0}
        wait_for_state(service.api, new["study_instance_uid"], logs=logs)
        lookup = wait_until(lambda: lookup_of(service.api, new["study_instance_uid"], ("retrieved",)), 120,
                            "the prior retrieved", logs=logs)
        assert lookup["prior_study_uid"] == prior["study_instance_uid"] and "20240110" in lookup["reason"]
        retrieved = wait_for_state(service.api, prior["study_instance_uid"], logs=logs)
        assert retrieved["state"] == "scored" and retrieved["prior_study_uid"] is None

        def compared() -> dict[str, Any] | None:
            items = API.get(f"{service.api}/api/worklist").json()["items"]
            row = next(i for i in items if i["study_uid"] == new["study_instance_uid"])
            return row if row["prior_study_uid"] else None

        row = wait_until(compared, 60, "the comparison filled in", logs=logs)
        assert row["prior_study_uid"] == prior["study_instance_uid"] and row["prior_days"] == 7
        assert row["trend"] == "worse" and abs(row["severity_change"] - 20.0) <= 3.0, row
        # the retrieved prior looks for no prior of its own
        assert lookup_of(service.api, prior["study_instance_uid"], ("pending", "running", "retrieved", "none",
                                                                      "skipped", "failed")) is None

        orthanc.stop()  # the PACS goes away: a new study is still scored, its lookup fails visibly
        other = write_visit(tmp_path / "other", "PACS-PRIOR-2", 20.0, 53, "20240120")
        assert set(push_files(study_files(tmp_path / "other"), host="127.0.0.1", port=port)) == {0}
        assert wait_for_state(service.api, other["study_instance_uid"], logs=logs)["state"] == "scored"
        failed = wait_until(lambda: lookup_of(service.api, other["study_instance_uid"], ("failed",)), 60,
                            "the lookup failed", logs=logs)
        assert "no association" in failed["reason"], failed
        assert "PACS-PRIOR" not in logs()  # no patient ID in the logs

        context, page, errors = new_page(browser)  # the admin page lists both lookups with their outcome
        try:
            sign_in(page, f"{service.api}/admin", "#prior-lookups tr[data-state=failed]")
            rows = page.locator("#prior-lookups tr").all_inner_texts()
            assert any("failed" in r and "no association" in r for r in rows), rows
            assert any("retrieved" in r and prior["study_instance_uid"] in r for r in rows), rows
            admin_png = tmp_path / "admin-prior-lookups.png"
            page.screenshot(path=str(admin_png), full_page=True)
            print(f"\nadmin screenshot: {admin_png}")
            assert errors == []
        finally:
            context.close()


def test_lookup_outcomes_without_a_pacs(monkeypatch: pytest.MonkeyPatch, sqlite_settings: Settings,
                                        sqlite_factory: sessionmaker[Session]) -> None:
    """Each outcome of a lookup, the PACS calls replaced: nothing earlier found, the prior already
    here, the daily limit, and only one lookup per study (never one for a retrieved prior)."""
    settings = sqlite_settings.model_copy(update={"priors_enabled": True, "priors_host": "127.0.0.1",
                                                  "priors_max_per_day": 1})
    with sqlite_factory.begin() as session:
        studies = [Study(study_uid=f"1.2.3.{n}", patient_id="P", study_date="20240301", state="scored")
                   for n in range(4)]
        session.add_all(studies)
        session.flush()
        for study in studies[:3]:
            request_lookup(session, study, settings)
            request_lookup(session, study, settings)  # once only
    answers: list[list[FoundStudy]] = [
        [FoundStudy("1.2.3.0", "20240301"), FoundStudy("9.9", "20240305")],  # itself and a later one only
        [FoundStudy("1.2.3.3", "20240201")],  # a study cttriage has
        [FoundStudy("7.7", "20240101"), FoundStudy("7.8", "20240210")],  # retrieved: the most recent
    ]
    moved: list[str] = []
    monkeypatch.setattr(prior_lookups, "find_ct_studies", lambda *_args: answers.pop(0))

    def move_study(_node: object, uid: str, _aet: str) -> int:
        moved.append(uid)
        return 40

    monkeypatch.setattr(prior_lookups, "move_study", move_study)
    assert [look_up_one(sqlite_factory, settings) for _ in range(4)] == [True, True, True, False]
    with sqlite_factory() as session:
        rows = session.execute(select(PriorLookup).order_by(PriorLookup.id)).scalars().all()
        assert [(r.state, r.prior_study_uid) for r in rows] == [
            ("none", None), ("skipped", None), ("retrieved", "7.8")]
        assert "already here" in (rows[1].reason or "") and moved == ["7.8"]
        retrieved = Study(study_uid="7.8", patient_id="P", study_date="20240210", state="scored")
        session.add(retrieved)
        session.flush()
        request_lookup(session, retrieved, settings)  # a retrieved prior looks for none of its own
        fourth = session.get(Study, studies[3].id)
        assert fourth is not None
        request_lookup(session, fourth, settings)
        session.commit()
    monkeypatch.setattr(prior_lookups, "find_ct_studies", lambda *_args: [FoundStudy("6.6", "20240101")])
    assert look_up_one(sqlite_factory, settings)
    with sqlite_factory() as session:
        last = session.execute(select(PriorLookup).order_by(PriorLookup.id.desc())).scalars().first()
        assert last is not None and last.study_id == studies[3].id
        assert (last.state, last.prior_study_uid) == ("skipped", None) and "daily limit of 1" in (last.reason or "")
        assert session.execute(select(func.count()).select_from(PriorLookup)).scalar_one() == 4
