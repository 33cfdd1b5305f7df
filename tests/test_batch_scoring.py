"""`cttriage score`: DICOM folders and NIfTI files scored offline, as a researcher runs it."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from models.phantom import PhantomSpec, phantom_volume
from tests.conftest import SHARED_DATA, write_phantom_study
from worker.batch_scoring import batch_items, score_all

SMALL = {"slices": 40, "rows": 160, "columns": 160, "pixel_spacing": 2.2, "slice_spacing": 7.0}


def write_nifti(path: Path, spec: PhantomSpec) -> dict:  # type: ignore[type-arg]
    """The phantom as NIfTI (RAS affine), canonical axes superior/posterior/left."""
    phantom = phantom_volume(spec)
    dz, dy, dx = phantom.spacing
    affine = np.array([[0, 0, -dx, 0], [0, -dy, 0, 0], [dz, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    nib.save(nib.Nifti1Image(phantom.hu.astype(np.int16), affine), str(path))
    return dict(phantom.truth)


def test_score_folders_and_nifti(tmp_path: Path) -> None:
    truth_a = write_phantom_study(tmp_path / "a", severity_left=30.0, severity_right=5.0, seed=71, **SMALL)
    truth_b = write_phantom_study(tmp_path / "b" / "deeper", severity_left=2.0, severity_right=45.0, seed=72, **SMALL)
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(sorted((tmp_path / "a").glob("*.dcm"))[0], single / "only.dcm")
    truth_n = write_nifti(tmp_path / "c.nii.gz", PhantomSpec(severity_left=15.0, severity_right=35.0, seed=73, **SMALL))

    result = subprocess.run([sys.executable, "-m", "app.cli", "score", str(tmp_path / "a"), str(tmp_path / "b"),
                             str(tmp_path / "c.nii.gz"), "--csv", "-"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {r["study_uid"]: r for r in csv.DictReader(io.StringIO(result.stdout))}
    for uid, truth in ((truth_a["study_instance_uid"], truth_a), (truth_b["study_instance_uid"], truth_b),
                       ("c.nii.gz", truth_n)):
        row = rows[uid]
        assert row["state"] == "scored" and row["method"] == "threshold"
        assert abs(float(row["severity_left"]) - truth["severity_left"]) <= 3.0, (uid, row)
        assert abs(float(row["severity_right"]) - truth["severity_right"]) <= 3.0, (uid, row)
    assert "[" in result.stderr  # the progress bar

    table = subprocess.run([sys.executable, "-m", "app.cli", "score", str(single)], capture_output=True, text=True,
                           timeout=120)
    assert table.returncode == 1  # something was not scored
    assert "rejected" in table.stdout and "fewer than" in table.stdout


def test_score_real_nifti_reports_what_happened() -> None:
    path = SHARED_DATA / "real-nifti" / "totalsegmentator-chest-crop-ct.nii.gz"
    if not path.exists():
        pytest.skip(f"real data not present at {path}")
    result = subprocess.run([sys.executable, "-m", "app.cli", "score", str(path), "--csv", "-"], capture_output=True,
                            text=True, timeout=300)
    [row] = list(csv.DictReader(io.StringIO(result.stdout)))
    # A crop around the heart: lungs only partly in view. Either scored, or rejected with a reason.
    assert row["state"] in ("scored", "rejected")
    assert row["state"] == "scored" or row["reason"]


def test_an_unreadable_file_is_a_failed_row_and_the_run_goes_on(tmp_path: Path) -> None:
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    also_broken = tmp_path / "also.nii"
    also_broken.write_bytes(b"\0" * 100)
    rows = score_all(batch_items([broken, also_broken]), min_slices=32, inplane_spacing_mm=2.0)
    assert [(r.study_uid, r.state) for r in rows] == [("broken.nii.gz", "failed"), ("also.nii", "failed")]
    assert all(r.reason for r in rows)
