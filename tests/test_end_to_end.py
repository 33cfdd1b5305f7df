"""The embedded service end to end: `cttriage serve` as a real process, studies pushed over DICOM
(pynetdicom SCU and dcmtk's storescu) and HTTP, scores read back from the worklist API.

One service instance serves the whole module; every study pushed here must end in its expected
state with its reason, and the listener must keep serving after the bad ones.
"""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless, generate_uid

from app.dicom.push import push_files
from tests.conftest import dcmtk_storescu, write_phantom_study
from tests.service_process import (
    ADMIN_KEY,
    API,
    EmbeddedService,
    c_echo,
    embedded_service,
    wait_for_state,
    wait_until,
)

#: Small but anatomically complete phantoms keep the module fast on 2 cores.
#: The pages' "open in viewer" link (tests/test_browser.py checks it).
VIEWER_URL_TEMPLATE = "https://viewer.example/ohif/viewer?StudyInstanceUIDs={study_uid}&accession={accession}"
SMALL = {"slices": 48, "rows": 192, "columns": 192, "pixel_spacing": 1.9, "slice_spacing": 6.0}


Service = EmbeddedService


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with embedded_service(tmp_path_factory.mktemp("embedded"), CTTRIAGE_SETTLE_SECONDS="3",
                          CTTRIAGE_ASSEMBLER_INTERVAL_SECONDS="0.5",
                          CTTRIAGE_VIEWER_URL_TEMPLATE=VIEWER_URL_TEMPLATE) as running:
        yield running


def study_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def assert_matches_truth(study: dict[str, Any], truth: dict[str, Any]) -> None:
    assert study["state"] == "scored", study
    result = study["results"][-1]
    assert study["method"] == "threshold" and study["identification"] is None
    # left/right not swapped, each within 3 percentage points of the phantom's ground truth
    assert abs(study["severity_left"] - truth["severity_left"]) <= 3.0, (study, truth)
    assert abs(study["severity_right"] - truth["severity_right"]) <= 3.0, (study, truth)
    assert abs(study["severity"] - max(truth["severity_left"], truth["severity_right"])) <= 3.0
    for side in ("left", "right"):
        measured, true = result[f"lung_volume_{side}_ml"], truth[f"lung_volume_{side}_ml"]
        assert abs(measured - true) <= 0.05 * true, (side, measured, true)
    assert {"select", "load", "lungs", "lesions", "severity"} <= set(result["timings"])
    assert study["model_version"]


def test_pynetdicom_push_is_scored_like_the_truth(service: Service, tmp_path: Path) -> None:
    truth = write_phantom_study(tmp_path, severity_left=32.0, severity_right=6.0, seed=11, **SMALL)
    statuses = push_files(study_files(tmp_path), host="127.0.0.1", port=service.dicom_port)
    assert set(statuses) == {0}
    study = wait_for_state(service.api, truth["study_instance_uid"], logs=service.process.log)
    assert_matches_truth(study, truth)
    assert study["severity_band"] == 2 and study["severity_left"] > study["severity_right"]
    [chosen] = [s for s in study["series"] if s["chosen"]]
    assert chosen["series_uid"] == truth["series_instance_uid"]


def test_dcmtk_storescu_compressed_and_mirrored_study(service: Service, tmp_path: Path) -> None:
    """A real PACS-side client, RLE-compressed pixel data, and rows stored mirrored (right lung
    diseased): left/right must follow the patient, not the image."""
    truth = write_phantom_study(tmp_path, severity_left=3.0, severity_right=55.0, seed=12, flip_lr=True,
                                transfer_syntax=RLELossless, **SMALL)
    result = dcmtk_storescu(study_files(tmp_path), service.dicom_port)
    assert result.returncode == 0, result.stderr
    study = wait_for_state(service.api, truth["study_instance_uid"], logs=service.process.log)
    assert_matches_truth(study, truth)
    assert study["severity_band"] == 3 and study["severity_right"] > study["severity_left"]


def test_worklist_puts_the_most_severe_first(service: Service, tmp_path: Path) -> None:
    mild = write_phantom_study(tmp_path / "mild", severity_left=8.0, severity_right=4.0, seed=13, **SMALL)
    severe = write_phantom_study(tmp_path / "severe", severity_left=10.0, severity_right=78.0, seed=14, **SMALL)
    for folder in ("mild", "severe"):
        assert set(push_files(study_files(tmp_path / folder), host="127.0.0.1", port=service.dicom_port)) == {0}
    for truth in (mild, severe):
        wait_for_state(service.api, truth["study_instance_uid"], logs=service.process.log)
    items = API.get(f"{service.api}/api/worklist", params={"state": "scored", "limit": 500}).json()["items"]
    order = [i["study_uid"] for i in items]
    assert order.index(severe["study_instance_uid"]) < order.index(mild["study_instance_uid"])
    priorities = [i["priority"] for i in items]
    assert priorities == sorted(priorities, reverse=True)
    assert items[0]["severity_band"] == 4
    page = API.get(f"{service.api}/").text
    assert "worklist" in page.lower()


def test_http_upload_of_a_zip_takes_the_same_path(service: Service, tmp_path: Path) -> None:
    truth = write_phantom_study(tmp_path / "s", severity_left=20.0, severity_right=20.0, seed=15, **SMALL)
    archive = shutil.make_archive(str(tmp_path / "study"), "zip", tmp_path / "s")
    with open(archive, "rb") as fh:
        response = API.post(f"{service.api}/api/studies", files=[("files", ("study.zip", fh, "application/zip"))],
                              timeout=60)
    # The folder holds truth.json beside the instances: some files stored, one quarantined.
    assert response.status_code == 207, response.text[:500]
    report = response.json()
    assert report["stored"] == truth["files"] and report["quarantined"] == 1
    assert [f["filename"] for f in report["files"] if f["status"] == "quarantined"] == ["truth.json"]
    study = wait_for_state(service.api, truth["study_instance_uid"], logs=service.process.log)
    assert_matches_truth(study, truth)


def test_late_instance_rescores_the_same_row(service: Service, tmp_path: Path) -> None:
    truth = write_phantom_study(tmp_path, severity_left=15.0, severity_right=2.0, seed=16, **SMALL)
    files = study_files(tmp_path)
    assert set(push_files(files[:-1], host="127.0.0.1", port=service.dicom_port)) == {0}
    first = wait_for_state(service.api, truth["study_instance_uid"], logs=service.process.log)
    # The study was scored or rejected without its last slice; the late slice reopens it.
    assert set(push_files(files[-1:], host="127.0.0.1", port=service.dicom_port)) == {0}
    uid = truth["study_instance_uid"]

    def rescored() -> dict[str, Any] | None:
        body = API.get(f"{service.api}/api/studies/{uid}").json()
        return body if body["version"] > first["version"] and body["state"] == "scored" else None

    study = wait_until(rescored, 240, "the rescore", logs=service.process.log)
    assert_matches_truth(study, truth)
    assert study["instance_count"] == truth["files"]
    rows = API.get(f"{service.api}/api/worklist", params={"limit": 500}).json()["items"]
    assert [r["study_uid"] for r in rows].count(uid) == 1


def test_explicit_rescore(service: Service, tmp_path: Path) -> None:
    truth = write_phantom_study(tmp_path, severity_left=5.0, severity_right=5.0, seed=17, **SMALL)
    push_files(study_files(tmp_path), host="127.0.0.1", port=service.dicom_port)
    uid = truth["study_instance_uid"]
    wait_for_state(service.api, uid, logs=service.process.log)
    response = API.post(f"{service.api}/api/studies/{uid}/rescore")
    assert response.status_code == 202 and response.json()["enqueued"] is True
    study = wait_until(lambda: (b := API.get(f"{service.api}/api/studies/{uid}").json())["state"] == "scored"
                       and len(b["results"]) == 2 and b, 240, "the rescore", logs=service.process.log)
    assert [r["study_version"] for r in study["results"]] == [1, 2]
    assert API.post(f"{service.api}/api/studies/1.2.3.404/rescore").status_code == 404


# --- bad input: each gets its clear state and reason; nothing received is lost -------------


def _edit_series(src: Path, dst: Path, edit: Any) -> list[Path]:
    """Copy a phantom series with new UIDs, letting ``edit(index, ds)`` change or drop (None) slices."""
    dst.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for i, path in enumerate(study_files(src)):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = edit(i, ds)
        if ds is not None:
            target = dst / path.name
            ds.save_as(target, enforce_file_format=True)
            out.append(target)
    return out


@pytest.fixture(scope="module")
def base_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("base")
    write_phantom_study(folder, severity_left=10.0, severity_right=10.0, seed=21, **SMALL)
    return folder


def _without_pixels(i: int, ds: pydicom.Dataset) -> pydicom.Dataset:
    del ds.PixelData
    return ds


def _as_mr(i: int, ds: pydicom.Dataset) -> pydicom.Dataset:
    ds.Modality = "MR"
    return ds


BAD_CASES: dict[str, tuple[Any, str]] = {
    "gap": (lambda i, ds: None if i in (20, 21) else ds, "gap"),
    "single_slice": (lambda i, ds: ds if i == 0 else None, "less than the 150.0 mm a chest needs: 1 slice"),
    "not_ct": (_as_mr, "not CT"),
    "no_pixels": (_without_pixels, "pixel data"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_series_is_rejected_with_a_reason(service: Service, base_series: Path, tmp_path: Path, case: str) -> None:
    edit, expected_reason = BAD_CASES[case]
    files = _edit_series(base_series, tmp_path, edit)
    uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert set(push_files(files, host="127.0.0.1", port=service.dicom_port)) == {0}
    study = wait_for_state(service.api, uid, logs=service.process.log)
    assert study["state"] == "rejected", study
    assert expected_reason.lower() in study["reason"].lower(), study["reason"]
    assert study["instance_count"] == len(files)
    for f in files:  # nothing received is lost
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        stored = list((service.data_dir / "storage").rglob(f"{ds.SOPInstanceUID}.dcm"))
        assert len(stored) == 1


def test_duplicate_positions_are_rejected(service: Service, base_series: Path, tmp_path: Path) -> None:
    positions: dict[int, Any] = {}

    def edit(i: int, ds: pydicom.Dataset) -> pydicom.Dataset:
        positions[i] = ds.ImagePositionPatient
        if i == 11:
            ds.ImagePositionPatient = positions[10]
        return ds

    files = _edit_series(base_series, tmp_path, edit)
    uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    push_files(files, host="127.0.0.1", port=service.dicom_port)
    study = wait_for_state(service.api, uid, logs=service.process.log)
    assert study["state"] == "rejected"
    assert "duplicate" in study["reason"].lower() or "spacing" in study["reason"].lower(), study["reason"]


def test_non_dicom_and_truncated_uploads(service: Service, base_series: Path) -> None:
    garbage = API.post(f"{service.api}/api/studies",
                       files=[("files", ("notes.txt", b"not a dicom file", "text/plain"))])
    assert garbage.status_code == 400
    assert garbage.headers["content-type"].startswith("application/problem+json")
    assert "not a readable DICOM" in garbage.json()["files"][0]["error"]
    quarantined = API.get(f"{service.api}/api/quarantine").json()
    assert any(q["original_name"] == "notes.txt" and "DICOM" in q["reason"] for q in quarantined)

    # a truncated instance: header readable, pixel data cut short -> stored, study rejected
    files = _edit_series(base_series, base_series.parent / "trunc", lambda i, ds: ds)
    uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    payloads = [(f.name, f.read_bytes()) for f in files]
    name, data = payloads[5]
    payloads[5] = (name, data[: len(data) - 5000])
    response = API.post(f"{service.api}/api/studies",
                          files=[("files", (n, io.BytesIO(d), "application/dicom")) for n, d in payloads], timeout=60)
    assert response.status_code in (202, 400), response.text
    study = wait_for_state(service.api, uid, logs=service.process.log)
    assert study["state"] == "rejected", study
    assert any(w in study["reason"].lower() for w in ("pixel", "truncat", "read")), study["reason"]


def test_listener_still_serves_after_bad_input(service: Service) -> None:
    assert c_echo(service.dicom_port) == 0
    assert service.process.alive()


def test_logs_hold_no_patient_data(service: Service, base_series: Path) -> None:
    """The phantoms carry PatientName PHANTOM^CHEST and PatientID PH0001; neither may be logged."""
    push_files(study_files(base_series), host="127.0.0.1", port=service.dicom_port)
    uid = str(pydicom.dcmread(study_files(base_series)[0]).StudyInstanceUID)
    wait_for_state(service.api, uid, logs=service.process.log)
    log = service.process.log()
    assert "association closed" in log  # the log is there and has content
    for value in ("PHANTOM^CHEST", "PHANTOM", "PH0001"):
        assert value not in log


def test_api_keys_and_roles(service: Service, tmp_path: Path) -> None:
    """No key → 401; a radiologist reads the worklist but not admin endpoints (403); keys are
    stored hashed; every study read is audited."""
    truth = write_phantom_study(tmp_path, severity_left=5.0, severity_right=5.0, seed=21, **SMALL)
    push_files(study_files(tmp_path), host="127.0.0.1", port=service.dicom_port)  # a study of its own to read
    assert httpx.get(f"{service.api}/api/worklist").status_code == 401
    assert httpx.get(f"{service.api}/api/worklist", headers={"Authorization": "Bearer nope"}).status_code == 401
    env = {**os.environ, "CTTRIAGE_DATA_DIR": str(service.data_dir)}
    added = subprocess.run([sys.executable, "-m", "app.cli", "users", "add", "dr-house", "--role", "radiologist"],
                           env=env, capture_output=True, text=True, check=True)
    key = added.stdout.strip().rsplit(" ", 1)[-1]
    assert key.startswith("ctt_")
    reader = {"Authorization": f"Bearer {key}"}
    worklist = httpx.get(f"{service.api}/api/worklist", params={"limit": 500}, headers=reader)
    assert worklist.status_code == 200
    assert httpx.get(f"{service.api}/api/quarantine", headers=reader).status_code == 403
    assert httpx.post(f"{service.api}/api/studies/1.2.3/rescore", headers=reader).status_code == 403
    uid = truth["study_instance_uid"]
    assert uid in {item["study_uid"] for item in worklist.json()["items"]}
    assert httpx.get(f"{service.api}/api/studies/{uid}", headers={"X-API-Key": key}).status_code == 200
    database = (service.data_dir / "cttriage.sqlite").read_bytes()
    assert key.encode() not in database and ADMIN_KEY.encode() not in database
    with sqlite3.connect(service.data_dir / "cttriage.sqlite") as conn:
        audit = conn.execute("SELECT actor, action FROM audit_events WHERE study_uid = ?", (uid,)).fetchall()
    assert ("dr-house", "read_study") in audit
    revoked = subprocess.run([sys.executable, "-m", "app.cli", "users", "revoke", "dr-house"], env=env,
                             capture_output=True, text=True)
    assert revoked.returncode == 0
    assert httpx.get(f"{service.api}/api/worklist", headers=reader).status_code == 401


def test_study_pictures_are_served(service: Service, tmp_path: Path) -> None:
    truth = write_phantom_study(tmp_path, severity_left=25.0, severity_right=5.0, seed=18, **SMALL)
    push_files(study_files(tmp_path), host="127.0.0.1", port=service.dicom_port)
    uid = truth["study_instance_uid"]
    study = wait_for_state(service.api, uid, logs=service.process.log)
    assert set(study["results"][-1]["details"]["files"]) == {"masks", "axial", "projection"}
    from PIL import Image

    for kind in ("axial", "projection"):
        response = API.get(f"{service.api}/api/studies/{uid}/images/{kind}.png")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(response.content)).convert("RGB")
        pixels = np.asarray(image).reshape(-1, 3).astype(int)
        lesion_coloured = ((pixels[:, 0] - pixels[:, 2]) > 80).mean()
        assert lesion_coloured > 0.002, kind  # the lesions are overlaid in colour
        (tmp_path / f"{kind}.png").write_bytes(response.content)
    assert API.get(f"{service.api}/api/studies/{uid}/images/coronal.png").status_code == 422
    assert httpx.get(f"{service.api}/api/studies/{uid}/images/axial.png").status_code == 401
