"""Uploads of files that make pydicom fail in odd ways: each gets its line in a per-file report,
never a 500; a zip's good members stay stored; every upload is audited (issue 12, item 6)."""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from app.db.models import AuditEvent, Instance, QuarantinedFile
from models.phantom import PhantomSpec
from models.phantom_dicom import write_phantom
from tests.test_admin import Setup, migrated_sqlite, setup  # noqa: F401 - the fixtures

NESTING_DEPTH = 3000


def _phantom(folder: Path) -> list[Path]:
    write_phantom(folder, PhantomSpec(slices=2, rows=32, columns=32, pixel_spacing=10.0))
    return sorted(folder.glob("*.dcm"))


def _fresh(path: Path) -> Dataset:
    """A phantom slice under new UIDs, so each bad file is its own instance."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _explicit_le(ds: Dataset, meta_syntax: UID = ExplicitVRLittleEndian, tail: bytes = b"") -> bytes:
    """Preamble, file meta naming ``meta_syntax``, then the dataset in explicit VR little endian
    (not deflated, whatever the meta says), then ``tail`` as raw bytes."""
    ds.file_meta.TransferSyntaxUID = meta_syntax
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    return out.getvalue() + body.getvalue() + tail


def deflate_mismatch(path: Path) -> bytes:
    return _explicit_le(_fresh(path), DeflatedExplicitVRLittleEndian)


def negative_frames(path: Path) -> bytes:
    ds = _fresh(path)
    ds.NumberOfFrames = -1
    return _explicit_le(ds)


def deeply_nested(path: Path) -> bytes:
    """A private sequence after the pixel data, nested NESTING_DEPTH levels deep, undefined lengths
    (written as raw bytes: pydicom would recurse as deep to write it)."""
    undefined = 0xFFFFFFFF
    open_level = struct.pack("<HH2sHI", 0x7FE1, 0x1010, b"SQ", 0, undefined) + struct.pack("<HHI", 0xFFFE, 0xE000,
                                                                                            undefined)
    close_level = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    creator = struct.pack("<HH2sH", 0x7FE1, 0x0010, b"LO", 8) + b"CTTRIAGE"
    return _explicit_le(_fresh(path), tail=creator + open_level * NESTING_DEPTH + close_level * NESTING_DEPTH)


BAD_FILES: dict[str, Callable[[Path], bytes]] = {
    "deflate-mismatch": deflate_mismatch,
    "frames-minus-one": negative_frames,
    "nested-3000": deeply_nested,
}


def _audit_rows(setup: Setup) -> list[AuditEvent]:  # noqa: F811
    with setup.factory() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == "upload")))


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
@pytest.mark.parametrize("setup", ["sqlite"], indirect=True)
def test_bad_file_alone_is_quarantined_with_a_report(setup: Setup, tmp_path: Path, kind: str) -> None:  # noqa: F811
    data = BAD_FILES[kind](_phantom(tmp_path / "study")[0])
    response = setup.client.post("/api/studies", headers=setup.admin,
                                 files=[("files", (f"{kind}.dcm", data, "application/dicom"))])
    assert response.status_code == 400, response.text
    body = response.json()
    assert response.headers["content-type"].startswith("application/problem+json")
    assert (body["stored"], body["quarantined"]) == (0, 1), body
    [line] = body["files"]
    assert line["status"] == "quarantined" and line["error"], line
    with setup.factory() as session:
        [kept] = session.scalars(select(QuarantinedFile).where(QuarantinedFile.original_name == f"{kind}.dcm"))
    assert kept.reason == line["error"]
    [audit] = _audit_rows(setup)
    assert audit.detail is not None
    assert audit.study_uid is None and audit.detail.startswith("0 instances stored, 1 quarantined"), audit.detail


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
@pytest.mark.parametrize("setup", ["sqlite"], indirect=True)
def test_zip_with_a_bad_member_stores_the_good_one(setup: Setup, tmp_path: Path, kind: str) -> None:  # noqa: F811
    good_path, bad_source = _phantom(tmp_path / "study")
    good = pydicom.dcmread(good_path)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/bad.dcm", BAD_FILES[kind](bad_source))
        zf.writestr("b/good.dcm", good_path.read_bytes())
    response = setup.client.post("/api/studies", headers=setup.admin,
                                 files=[("files", ("study.zip", archive.getvalue(), "application/zip"))])
    assert response.status_code == 207, response.text
    body = response.json()
    assert (body["stored"], body["rejected"], body["quarantined"]) == (1, 1, 1), body
    by_name = {line["filename"]: line for line in body["files"]}
    assert by_name["a/bad.dcm"]["status"] == "quarantined" and by_name["a/bad.dcm"]["error"]
    assert by_name["b/good.dcm"]["status"] == "stored"
    with setup.factory() as session:
        assert session.scalar(select(Instance.id).where(Instance.sop_instance_uid == good.SOPInstanceUID))
    [audit] = _audit_rows(setup)
    assert audit.study_uid == good.StudyInstanceUID, audit
    assert audit.detail is not None
    assert audit.detail.startswith("1 instances stored, 1 quarantined"), audit.detail


@pytest.mark.parametrize("setup", ["sqlite"], indirect=True)
def test_all_stored_answers_202_and_a_resend_is_a_duplicate(setup: Setup, tmp_path: Path) -> None:  # noqa: F811
    files = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in _phantom(tmp_path / "study")]
    first = setup.client.post("/api/studies", headers=setup.admin, files=files)
    assert first.status_code == 202, first.text
    assert [line["status"] for line in first.json()["files"]] == ["stored", "stored"]
    again = setup.client.post("/api/studies", headers=setup.admin, files=files)
    assert again.status_code == 202, again.text
    assert (again.json()["stored"], again.json()["duplicates"]) == (2, 2)
    assert len(_audit_rows(setup)) == 2
