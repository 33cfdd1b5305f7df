"""The prior comparison in a real headless Chromium (tests/test_browser.py's setup): two studies of
one patient pushed over DICOM; the worklist shows the follow-up's trend and the days since the
prior, and its study page shows both studies' pictures side by side with both scores.
Screenshots go to the test's tmp folder (paths printed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pydicom

from models.phantom import PhantomSpec
from models.phantom_dicom import write_phantom
from tests import test_browser, test_end_to_end
from tests.service_process import API, wait_for_state
from tests.test_browser import new_page, push, row, sign_in
from tests.test_end_to_end import SMALL, Service, study_files

#: One embedded service and one Chromium for this module (the fixtures of the modules they come from).
service = test_end_to_end.service
browser = test_browser.browser
PATIENT = "BROWSER-PRIOR-1"


def write_visit(folder: Path, accession: str, severity_left: float, seed: int, study_date: str) -> dict[str, Any]:
    """A phantom of PATIENT on ``study_date`` whose left lung has ``severity_left`` % lesions."""
    # SMALL is a plain dict[str, float] (tests.test_end_to_end): its keys are PhantomSpec's geometry fields.
    geometry = cast(dict[str, Any], SMALL)
    truth = write_phantom(folder, PhantomSpec(severity_left=severity_left, severity_right=4.0, seed=seed, **geometry),
                          accession=accession, patient_id=PATIENT, patient_name="PRIOR^PATIENT")
    for path in study_files(folder):
        ds = pydicom.dcmread(path)
        ds.StudyDate = study_date
        ds.save_as(path, enforce_file_format=True)
    return truth


def loaded(page: Any, selector: str) -> None:
    page.wait_for_function(f"() => {{ const i = document.querySelector('{selector}');"
                           " return i && i.complete && i.naturalWidth > 0; }")


def test_trend_column_and_side_by_side_pictures(service: Service, browser: Any, tmp_path: Path) -> None:
    prior = write_visit(tmp_path / "prior", "PRIOR01", 10.0, 41, "20240110")
    follow_up = write_visit(tmp_path / "follow", "FOLLOW01", 30.0, 42, "20240117")
    for truth, folder in ((prior, "prior"), (follow_up, "follow")):  # in order: the prior is scored first
        push(service, study_files(tmp_path / folder), truth["study_instance_uid"], "scored")
        wait_for_state(service.api, truth["study_instance_uid"], logs=service.process.log)
    scored = API.get(f"{service.api}/api/studies/{follow_up['study_instance_uid']}").json()
    change = scored["severity_change"]
    assert scored["trend"] == "worse" and abs(change - 20.0) <= 3.0, scored

    context, page, errors = new_page(browser)
    try:
        sign_in(page, f"{service.api}/")
        follow_row = row(page, "FOLLOW01")
        follow_row.wait_for()
        trend = follow_row.locator(".trend")
        assert trend.get_attribute("data-trend") == "worse"
        assert trend.inner_text() == f"↑ +{change:.1f} pt"
        assert "2024-01-10" in (trend.get_attribute("title") or "")
        assert follow_row.locator("td.prior-days").inner_text() == "7 d"
        prior_row = row(page, "PRIOR01")
        assert prior_row.locator(".trend").inner_text() == "" and prior_row.locator("td.prior-days").inner_text() == ""
        headers = page.locator("#worklist thead th").all_text_contents()
        assert "Trend" in headers and "Since prior" in headers
        worklist_png = tmp_path / "worklist-trend.png"
        page.screenshot(path=str(worklist_png), full_page=True)
        print(f"\nworklist screenshot: {worklist_png}")

        follow_row.locator("td.accession a").click()
        page.wait_for_url(f"**/studies/{follow_up['study_instance_uid']}")
        page.wait_for_selector("#comparison-panel:not([hidden])")
        loaded(page, "#prior-projection img")
        loaded(page, "#current-projection img")
        boxes = [page.locator(f"#{side}-projection").bounding_box() for side in ("prior", "current")]
        assert boxes[0]["x"] + boxes[0]["width"] <= boxes[1]["x"] and abs(boxes[0]["y"] - boxes[1]["y"]) < 2, boxes
        prior_caption = page.locator("#prior-projection figcaption").inner_text()
        current_caption = page.locator("#current-projection figcaption").inner_text()
        assert prior_caption.startswith("Prior study · 2024-01-10 · max-lung"), prior_caption
        assert current_caption.startswith("This study · 2024-01-17 · max-lung"), current_caption
        prior_severity = API.get(f"{service.api}/api/studies/{prior['study_instance_uid']}").json()["severity"]
        assert f"{prior_severity:.1f} %" in prior_caption and f"{scored['severity']:.1f} %" in current_caption
        comparison = page.locator("#comparison-text").inner_text()
        assert "7 days before" in comparison and f"+{change:.1f} pt" in comparison, comparison
        study_png = tmp_path / "study-comparison.png"
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(study_png), full_page=True)
        print(f"study comparison screenshot: {study_png}")
        assert errors == []
    finally:
        context.close()
