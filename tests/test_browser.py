"""The web pages in a real headless Chromium (Debian's `chromium`, driven by Playwright), and the
admin API against the same running service.

The worklist page is loaded once; phantom studies are then pushed over DICOM and must appear
at the right place with the right band colour without a reload (the live stream). The detail
page must show the projection picture. Screenshots go to the test's tmp folder (paths printed).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest

from app.admin import directory_bytes
from app.dicom.push import push_files
from models.lungs_threshold import LEFT_LUNG
from models.phantom import PhantomSpec, phantom_volume
from models.phantom_dicom import phantom_datasets, write_phantom
from tests import test_end_to_end
from tests.service_process import ADMIN_KEY, API, wait_for_state, wait_until
from tests.test_end_to_end import SMALL, Service, study_files

#: The embedded service of the end-to-end tests (settle 3 s), one instance for this module.
service = test_end_to_end.service

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: The CT-3 colour of app/api/static/app.css (--band-3).
BAND_3_RGB = "rgb(255, 92, 77)"
BAND_1_RGB = "rgb(242, 220, 75)"
#: DICOM text that would run as script if a page inserted it as HTML.
HOSTILE_DESCRIPTION = '<img src=x onerror="window.__xss=1">CHEST'
TIMEOUT_MS = 150_000

#: Every study this module pushed and the state it must end in (for the admin overview test).
PUSHED: dict[str, str] = {}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover - installed by scripts/install.sh (test extra)
        pytest.fail("playwright is required: pip install -e '.[test]'")
    if not CHROMIUM.exists():  # pragma: no cover - installed by scripts/install.sh (apt)
        pytest.fail("Debian's chromium is required: apt-get install -y chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def write_study(folder: Path, accession: str, severity_left: float, severity_right: float, seed: int,
                description: str | None = None, dense_left_base: bool = False, **spec: Any) -> dict[str, Any]:
    """A phantom study with its own accession number (and description, age) in every instance.
    ``dense_left_base``: the lower half of the left lung is solid (35 HU, as a collapsed lobe or an
    effusion), which the threshold lungs leave out: the scoring flags its severity a lower bound."""
    phantom_spec = PhantomSpec(severity_left=severity_left, severity_right=severity_right, seed=seed,
                               **{**SMALL, **spec})
    if dense_left_base:
        phantom = phantom_volume(phantom_spec)
        left = phantom.lungs == LEFT_LUNG
        slices = np.flatnonzero(left.any(axis=(1, 2)))
        left[(slices[0] + slices[-1]) // 2:] = False
        hu = phantom.hu.copy()
        hu[left] = 35
        datasets = phantom_datasets(dataclasses.replace(phantom, hu=hu), phantom_spec, accession=accession)
        folder.mkdir(parents=True)
        for n, ds in enumerate(datasets, 1):
            ds.save_as(folder / f"IM{n:04d}.dcm", enforce_file_format=True)
        truth = {"study_instance_uid": str(datasets[0].StudyInstanceUID)}
    else:
        truth = write_phantom(folder, phantom_spec, accession=accession)
    for path in study_files(folder):
        ds = pydicom.dcmread(path)
        ds.PatientAge = "054Y"
        if description is not None:
            ds.StudyDescription = description
        ds.save_as(path, enforce_file_format=True)
    return truth


def push(service: Service, files: list[Path], uid: str, expected_state: str) -> None:
    assert set(push_files(files, host="127.0.0.1", port=service.dicom_port)) == {0}
    PUSHED[uid] = expected_state


def new_page(browser: Any) -> tuple[Any, Any, list[str]]:
    """A fresh context's page (1700 px wide) and the list its script errors are collected in."""
    context = browser.new_context(viewport={"width": 1700, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return context, page, errors


def sign_in(page: Any, url: str, ready: str = "#app:not([hidden])") -> None:
    """Open ``url`` and sign in with the admin key; wait for ``ready``."""
    page.goto(url)
    page.fill("#signin-key", ADMIN_KEY)
    page.click("#signin button[type=submit]")
    page.wait_for_selector(ready)


def row(page: Any, accession: str) -> Any:
    return page.locator("#rows tr", has=page.locator("td.accession", has_text=accession))


def test_worklist_updates_live_and_the_detail_page_shows_the_pictures(
        service: Service, browser: Any, tmp_path: Path) -> None:
    context, page, errors = new_page(browser)
    try:
        page.goto(f"{service.api}/")
        # a wrong key is refused with a clear message
        page.fill("#signin-key", "ctt_wrong")
        page.click("#signin button[type=submit]")
        page.wait_for_selector("#signin-message:has-text('Unknown or revoked')")
        page.fill("#signin-key", ADMIN_KEY)
        page.click("#signin button[type=submit]")
        page.wait_for_selector("#app:not([hidden])")
        page.wait_for_selector("#live.on")  # the event stream is open
        page.evaluate("window.__notReloaded = true")

        mild = write_study(tmp_path / "mild", "MILD01", 8.0, 4.0, seed=31)
        push(service, study_files(tmp_path / "mild"), mild["study_instance_uid"], "scored")
        mild_band = row(page, "MILD01").locator(".band")
        mild_band.wait_for()
        page.wait_for_function("() => [...document.querySelectorAll('#rows tr')].some("
                               "r => r.innerText.includes('MILD01') && r.querySelector('.band.b1'))")

        severe = write_study(tmp_path / "severe", "SEVERE01", 60.0, 10.0, seed=32, description=HOSTILE_DESCRIPTION,
                             scout=True)
        push(service, study_files(tmp_path / "severe"), severe["study_instance_uid"], "scored")
        page.wait_for_function("() => [...document.querySelectorAll('#rows tr')].some("
                               "r => r.innerText.includes('SEVERE01') && r.querySelector('.band.b3'))")

        # A 10-20 % severity that is only a lower bound (dense lung left out of the mask): at least CT-3.
        dense = write_study(tmp_path / "dense", "DENSE01", 20.0, 8.0, seed=35, dense_left_base=True)
        push(service, study_files(tmp_path / "dense"), dense["study_instance_uid"], "scored")
        page.wait_for_function("() => [...document.querySelectorAll('#rows tr')].some("
                               "r => r.innerText.includes('DENSE01') && r.querySelector('.band.b3'))")

        assert page.evaluate("window.__notReloaded") is True  # appeared without a reload
        accessions = page.locator("#rows td.accession").all_inner_texts()
        assert accessions.index("SEVERE01") < accessions.index("DENSE01") < accessions.index("MILD01"), accessions
        dense_row = row(page, "DENSE01")
        assert dense_row.locator(".band").inner_text() == "≥ CT-3"
        marker = dense_row.locator(".flag.lower-bound")
        assert marker.get_attribute("data-code") == "LungMaskImplausible"
        assert "lower bound" in marker.inner_text() and "lower bound" in (marker.get_attribute("title") or "")
        assert dense_row.locator("td.sev").inner_text().startswith("≥ ")
        assert row(page, "MILD01").locator(".flag").count() == 0
        severe_band = row(page, "SEVERE01").locator(".band")
        assert severe_band.inner_text() == "CT-3"
        assert severe_band.evaluate("e => getComputedStyle(e).backgroundColor") == BAND_3_RGB
        assert mild_band.evaluate("e => getComputedStyle(e).backgroundColor") == BAND_1_RGB
        severe_row = row(page, "SEVERE01")
        assert HOSTILE_DESCRIPTION in severe_row.inner_text()  # shown as text, never run
        assert page.evaluate("window.__xss") is None
        assert "54 y" in severe_row.inner_text()
        worklist_png = tmp_path / "worklist.png"
        page.screenshot(path=str(worklist_png), full_page=True)
        print(f"\nworklist screenshot: {worklist_png}")

        # keyboard: move to the severe study with j/k and open it with Enter
        page.keyboard.press("Home")
        for _ in range(len(accessions)):
            if page.evaluate("document.activeElement.dataset.uid") == severe["study_instance_uid"]:
                break
            page.keyboard.press("j")
        page.keyboard.press("Enter")
        page.wait_for_url(f"**/studies/{severe['study_instance_uid']}")
        page.wait_for_function("() => { const i = document.querySelector('#projection img');"
                               " return i && i.complete && i.naturalWidth > 0; }")
        page.wait_for_function("() => { const i = document.querySelector('#axial img');"
                               " return i && i.complete && i.naturalWidth > 0; }")
        assert page.locator("#summary .band").inner_text() == "CT-3"
        assert "No flags" in page.locator("#flags").inner_text()
        assert "lower bound" not in page.locator("#summary").inner_text()
        descriptor_rows = page.locator("#descriptor-rows tr").all_inner_texts()
        assert [r.split("\t")[0] for r in descriptor_rows] == ["Right", "Left"], descriptor_rows
        assert all("ml" in r and "%" in r for r in descriptor_rows), descriptor_rows
        assert page.locator("#bilateral").inner_text().startswith("Bilateral: yes")
        series_text = page.locator("#series").inner_text()
        assert "✓ scored" in series_text and "localizer" in series_text.lower(), series_text
        history = page.locator("#results tr").all_inner_texts()
        assert len(history) == 1 and "threshold" in history[0]
        assert "lesions" in page.locator("#timings").inner_text()
        assert HOSTILE_DESCRIPTION in page.locator("#meta").inner_text()
        assert page.evaluate("window.__xss") is None
        study_png = tmp_path / "study.png"
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(study_png), full_page=True)
        print(f"study detail screenshot: {study_png}")

        # The flagged study: its flags listed with their messages, the severity said to be a lower bound.
        page.goto(f"{service.api}/studies/{dense['study_instance_uid']}")
        page.wait_for_selector("#flags li[data-code=LungMaskImplausible]")
        assert page.locator("#summary .band").inner_text() == "≥ CT-3"
        assert "lower bound" in page.locator("#summary").inner_text().lower()
        flags_text = page.locator("#flags").inner_text()
        assert "LungMaskImplausible" in flags_text and "left lung mask holds" in flags_text, flags_text
        assert "is a lower bound" in flags_text
        assert page.locator("#descriptor-rows tr").count() == 2
        assert "Lung mask implausible" in page.locator("#results").inner_text()  # the scoring's own flags
        page.wait_for_function("() => { const i = document.querySelector('#projection img');"
                               " return i && i.complete && i.naturalWidth > 0; }")
        flagged_png = tmp_path / "study-flagged.png"
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(flagged_png), full_page=True)
        print(f"flagged study screenshot: {flagged_png}")

        page.keyboard.press("Escape")
        page.wait_for_url(f"{service.api}/")
        page.wait_for_selector("#rows tr[data-uid]")

        # Paging: one row a page here; "Show more" adds the next, most urgent first throughout.
        page.goto(f"{service.api}/?rows=1")
        page.wait_for_selector("#rows tr[data-uid]")
        assert page.locator("#rows td.accession").all_inner_texts() == ["SEVERE01"]
        assert page.locator("#more").inner_text() == "Show 1 more"
        for shown in (2, 3):
            page.click("#more")
            page.wait_for_function(f"() => document.querySelectorAll('#rows tr[data-uid]').length === {shown}")
        assert page.locator("#rows td.accession").all_inner_texts() == ["SEVERE01", "DENSE01", "MILD01"]
        assert page.locator("#more").is_hidden()
        assert not errors, errors
    finally:
        context.close()


def test_admin_api_roles_and_overview_numbers(service: Service, browser: Any, tmp_path: Path) -> None:
    # a study that is rejected (one slice) and one that is scored, on top of what was pushed before
    scored = write_study(tmp_path / "scored", "ADMIN01", 30.0, 5.0, seed=33)
    push(service, study_files(tmp_path / "scored"), scored["study_instance_uid"], "scored")
    lonely = write_study(tmp_path / "lonely", "ADMIN02", 5.0, 5.0, seed=34)
    push(service, study_files(tmp_path / "lonely")[:1], lonely["study_instance_uid"], "rejected")
    for uid in PUSHED:
        wait_for_state(service.api, uid, logs=service.process.log)

    # roles: no key 401, a radiologist 403 on every admin endpoint
    reader = _radiologist_headers(service)
    for method, path in (("GET", "overview"), ("GET", "failures"), ("GET", "audit"), ("GET", "export.csv"),
                         ("GET", "export.json"), ("POST", f"studies/{lonely['study_instance_uid']}/retry")):
        assert httpx.request(method, f"{service.api}/api/admin/{path}").status_code == 401
        assert httpx.request(method, f"{service.api}/api/admin/{path}", headers=reader).status_code == 403, path
    assert httpx.get(f"{service.api}/api/me", headers=reader).json()["role"] == "radiologist"

    overview = API.get(f"{service.api}/api/admin/overview").json()
    expected = Counter(PUSHED.values())
    assert overview["studies_by_state"] == {s: expected.get(s, 0) for s in overview["studies_by_state"]}
    assert overview["queue"] == {"depth": 0, "pending": 0, "enqueued": 0, "running": 0}
    for window in ("hour", "day"):
        numbers = overview["throughput"][window]
        counted = (numbers["scored"], numbers["rejected"], numbers["failed"])
        assert counted == (expected["scored"], expected["rejected"], 0)
        latency = numbers["latency_seconds"]
        assert latency["count"] == expected["scored"]
        assert 0 < latency["p50"] <= latency["p95"] < 240  # settle (3 s) + queue + scoring
    [worker] = overview["workers"]
    assert worker["name"].startswith("cttriage-") and worker["jobs_finished"] == len(PUSHED)
    storage = overview["storage"]
    root = service.data_dir / "storage"
    assert storage["instances_bytes"] == directory_bytes(root) - directory_bytes(root / "_derived") \
        - directory_bytes(root / "_quarantine")
    assert storage["derived_bytes"] == directory_bytes(root / "_derived") > 0
    assert overview["celery"]["checked"] is False  # the embedded SQLite broker cannot broadcast

    failures = API.get(f"{service.api}/api/admin/failures").json()
    [failure] = failures["items"]
    assert failure["study_uid"] == lonely["study_instance_uid"] and failure["state"] == "rejected"
    assert "less than the 150.0 mm a chest needs" in failure["reason"] and failure["reason_code"]
    assert failure["last_job"]["error"] == failure["reason"]

    # export: one row per scoring, one per study never scored
    rows = list(csv.DictReader(io.StringIO(API.get(f"{service.api}/api/admin/export.csv").text)))
    assert sorted(r["study_uid"] for r in rows) == sorted(PUSHED)
    by_uid = {r["study_uid"]: r for r in rows}
    assert by_uid[lonely["study_instance_uid"]]["result_id"] == ""
    exported = by_uid[scored["study_instance_uid"]]
    study = API.get(f"{service.api}/api/studies/{scored['study_instance_uid']}").json()
    assert exported["method"] == "threshold" and exported["model_version"] == study["model_version"]
    assert float(exported["severity"]) == pytest.approx(study["severity"]) and exported["latest"] == "True"
    assert exported["accession_number"] == "ADMIN01" and exported["severity_band"] == str(study["severity_band"])
    assert len(json.loads(API.get(f"{service.api}/api/admin/export.json").content)) == len(rows)

    # the admin page: tiles, the failure with its retry button (a new version, rejected again, audited)
    _retry_on_the_admin_page(service, browser, tmp_path, "ADMIN02")
    lonely_url = f"{service.api}/api/studies/{lonely['study_instance_uid']}"
    wait_until(lambda: (s := API.get(lonely_url).json())["version"] == 2 and s["state"] == "rejected", 120,
               "the retry", logs=service.process.log)
    audit = API.get(f"{service.api}/api/admin/audit", params={"study_uid": lonely["study_instance_uid"]}).json()
    assert ("admin", "rescore") in [(a["actor"], a["action"]) for a in audit["items"]]
    assert API.get(f"{service.api}/api/admin/audit", params={"action": "export"}).json()["total"] == 2
    assert API.post(f"{service.api}/api/admin/studies/1.2.3.404/retry").status_code == 404


def test_worklist_event_stream(service: Service) -> None:
    """The live stream authenticates like the API and says "worklist" at once when connected."""
    assert httpx.get(f"{service.api}/api/worklist/events").status_code == 401
    with API.stream("GET", f"{service.api}/api/worklist/events", timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        first = [next(lines) for _ in range(4)]
    assert "event: worklist" in first, first


def _retry_on_the_admin_page(service: Service, browser: Any, tmp_path: Path, accession: str) -> None:
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        sign_in(page, f"{service.api}/admin", "#tiles .tile.alert:has-text('rejected')")  # a rejected one is flagged
        failure = page.locator("#failures tr", has_text=accession)
        assert "less than the 150.0 mm a chest needs" in failure.inner_text()
        failure.locator("button").click()
        page.wait_for_selector(f"#failures tr:has-text('{accession}') :text('again')")  # retried, rejected again
        page.wait_for_selector("#audit tr:has-text('rescore')")
        page.evaluate("window.scrollTo(0, 0)")
        admin_png = tmp_path / "admin.png"
        page.screenshot(path=str(admin_png), full_page=True)
        print(f"\nadmin screenshot: {admin_png}")
    finally:
        context.close()


def _radiologist_headers(service: Service) -> dict[str, str]:
    env = {**os.environ, "CTTRIAGE_DATA_DIR": str(service.data_dir)}
    added = subprocess.run([sys.executable, "-m", "app.cli", "users", "add", "reader", "--role", "radiologist"],
                           env=env, capture_output=True, text=True, check=True)
    return {"Authorization": f"Bearer {added.stdout.strip().rsplit(' ', 1)[-1]}"}


SCREENS = Path("/tmp/cttriage-screens-i11")


def add_failed_study(data_dir: Path) -> str:
    """A study that failed while scoring its chosen series, with a returned SEG (144 frames) beside
    it: written straight into the service's database (a real scoring failure is a bug to provoke)."""
    from sqlalchemy.orm import sessionmaker

    from app.db.models import Job, JobState, Series, Study, StudyState, utcnow
    from app.db.session import make_engine

    engine = make_engine(f"sqlite:///{data_dir / 'cttriage.sqlite'}")
    reason = "scoring failed: ValueError: lung mask is empty"
    with sessionmaker(engine).begin() as session:
        study = Study(study_uid="1.2.826.0.1.3680043.99.11.1", accession_number=None, study_date="20260315",
                      patient_name="FAILED^FRED", patient_id="PID-FAIL", state=StudyState.failed.value,
                      reason=reason, reason_code="ValueError", instance_count=145,
                      chosen_series_uid="1.2.826.0.1.3680043.99.11.2")
        session.add(study)
        session.flush()
        session.add_all([
            Series(study_id=study.id, series_uid="1.2.826.0.1.3680043.99.11.2", series_number=2, modality="CT",
                   description="CHEST 1mm", instance_count=144, chosen=True, slice_count=144,
                   slice_spacing_mm=1.25),
            Series(study_id=study.id, series_uid="1.2.826.0.1.3680043.99.11.3", series_number=99, modality="SEG",
                   description="cttriage lungs and lesions", instance_count=1, chosen=False,
                   skip_reason="modality SEG is not CT", slice_count=144, slice_spacing_mm=0.0),
            Job(study_id=study.id, study_version=1, state=JobState.failed.value, trigger="settled", attempts=1,
                error=reason, created_at=utcnow(), finished_at=utcnow()),
        ])
    engine.dispose()
    return "1.2.826.0.1.3680043.99.11.1"


def test_rejected_and_failed_pages_and_patient_fields(service: Service, browser: Any, tmp_path: Path) -> None:
    SCREENS.mkdir(parents=True, exist_ok=True)
    scored = write_study(tmp_path / "scored", "PAT01", 30.0, 12.0, seed=41)
    for path in study_files(tmp_path / "scored"):  # an identified patient
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID = "SMITH^ANNA", "PID-0042"
        ds.save_as(path, enforce_file_format=True)
    lonely = write_study(tmp_path / "lonely", "", 10.0, 10.0, seed=42)  # anonymised: no accession
    for path in study_files(tmp_path / "lonely"):
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID = "", "ANON-77"
        ds.save_as(path, enforce_file_format=True)
    push(service, study_files(tmp_path / "scored"), scored["study_instance_uid"], "scored")
    push(service, study_files(tmp_path / "lonely")[:1], lonely["study_instance_uid"], "rejected")
    wait_for_state(service.api, scored["study_instance_uid"], logs=service.process.log)
    rejected = wait_for_state(service.api, lonely["study_instance_uid"], logs=service.process.log)
    assert rejected["state"] == "rejected" and rejected["reason_code"] == "NoUsableSeriesError", rejected
    assert all(s["skip_reason"] for s in rejected["series"]), rejected["series"]  # recorded before the rejection
    failed_uid = add_failed_study(service.data_dir)

    context, page, errors = new_page(browser)
    try:
        sign_in(page, f"{service.api}/")
        patient_row = page.locator("#rows tr", has=page.locator("td.patient", has_text="PID-0042"))
        patient_row.wait_for()
        assert "SMITH, ANNA" in patient_row.locator("td.patient").inner_text()
        assert patient_row.locator("td.accession").inner_text() == "PAT01"
        assert patient_row.locator("td.modality").inner_text() == "CT"
        href = patient_row.locator("a.viewer").get_attribute("href")
        assert href == test_end_to_end.VIEWER_URL_TEMPLATE.format(study_uid=scored["study_instance_uid"],
                                                                   accession="PAT01"), href
        anonymous = page.locator("#rows tr", has=page.locator("td.patient", has_text="ANON-77"))
        assert anonymous.locator("td.accession").inner_text() == "patient ANON-77"
        page.screenshot(path=str(SCREENS / "worklist.png"), full_page=True)
        # the patient ID filter, kept in the URL
        page.fill("#f-patient", "PID-0042")
        page.press("#f-patient", "Enter")
        page.wait_for_function("() => document.querySelectorAll('#rows tr[data-uid]').length === 1")
        assert "patient=PID-0042" in page.url
        page.screenshot(path=str(SCREENS / "worklist-filtered.png"), full_page=True)

        # rejected: the reason code and text, each series its own reason, no pictures to wait for
        page.goto(f"{service.api}/studies/{lonely['study_instance_uid']}")
        page.wait_for_selector("#summary .reason-code")
        assert page.locator("#summary .reason-code").inner_text() == "NoUsableSeriesError"
        assert "no usable series" in page.locator("#summary .reason").inner_text()
        decisions = page.locator("#series td.decision").all_inner_texts()
        assert decisions and all("1 slice" in d for d in decisions), decisions
        assert "✓ scored" not in page.locator("#series").inner_text()
        assert page.locator("#pictures-panel").is_hidden()
        assert not any(x.is_visible() for x in page.get_by_text("loading…").all())
        assert page.locator("#summary .patient-id").inner_text() == "ANON-77"
        page.screenshot(path=str(SCREENS / "study-rejected.png"), full_page=True)

        # failed: the chosen series is not "scored"; the SEG shows no slices or spacing
        page.goto(f"{service.api}/studies/{failed_uid}")
        page.wait_for_selector("#summary .reason-code")
        assert page.locator("#summary .reason-code").inner_text() == "ValueError"
        series = page.locator("#series").inner_text()
        assert "✓ scored" not in series and "scoring failed" in series, series
        seg = page.locator("#series tr", has_text="SEG").inner_text()
        assert "0.00 mm" not in seg and "144 frames" in seg, seg
        assert page.locator("#pictures-panel").is_hidden()
        page.screenshot(path=str(SCREENS / "study-failed.png"), full_page=True)

        # scored: pictures, the chosen series scored, patient fields and the viewer link
        page.goto(f"{service.api}/studies/{scored['study_instance_uid']}")
        page.wait_for_function("() => { const i = document.querySelector('#projection img');"
                               " return i && i.complete && i.naturalWidth > 0; }")
        assert "✓ scored" in page.locator("#series").inner_text()
        assert page.locator("#summary .patient-name").inner_text() == "SMITH, ANNA"
        assert page.locator("#summary a.viewer").get_attribute("href") == href
        page.screenshot(path=str(SCREENS / "study-scored.png"), full_page=True)
        assert not errors, errors
    finally:
        context.close()
