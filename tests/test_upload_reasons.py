"""An uploaded file that is DICOM but lacks what we key on is quarantined with what it lacks."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from app.db.models import QuarantinedFile
from models.phantom import PhantomSpec
from models.phantom_dicom import write_phantom
from tests.test_admin import Setup, migrated_sqlite, setup  # noqa: F401 - the fixtures


@pytest.mark.parametrize("setup", ["sqlite"], indirect=True)
def test_missing_uids_are_named_not_called_unreadable(setup: Setup, tmp_path: Path) -> None:  # noqa: F811
    write_phantom(tmp_path / "study", PhantomSpec(slices=2, rows=32, columns=32, pixel_spacing=10.0))
    ds = pydicom.dcmread(sorted((tmp_path / "study").glob("*.dcm"))[0])
    del ds.SOPInstanceUID
    del ds.StudyInstanceUID
    data = io.BytesIO()
    ds.save_as(data, enforce_file_format=True)
    response = setup.client.post("/api/studies", headers=setup.admin,
                                 files=[("files", ("no-uids.dcm", data.getvalue(), "application/dicom"))])
    assert response.status_code == 400, response.text
    [refused] = response.json()["files"]
    assert refused["error"] == "instance lacks StudyInstanceUID, SOPInstanceUID", refused
    with setup.factory() as session:
        [kept] = session.scalars(select(QuarantinedFile).where(QuarantinedFile.original_name == "no-uids.dcm"))
    assert kept.reason == "instance lacks StudyInstanceUID, SOPInstanceUID"
