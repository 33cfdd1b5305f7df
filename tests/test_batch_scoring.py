"""`cttriage score`: DICOM folders and NIfTI files scored offline, as a researcher runs it."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TypedDict

import nibabel as nib
import numpy as np
import pytest

from app.series_selection import SeriesCriteria
from models.phantom import PhantomSpec, phantom_volume
from models.predictor import ThresholdPredictor
from tests.conftest import SHARED_DATA, write_phantom_study
from worker.batch_scoring import batch_items, score_all


class Geometry(TypedDict):
    """PhantomSpec's geometry fields, typed so that ``**SMALL`` type-checks."""

    slices: int
    rows: int
    columns: int
    pixel_spacing: float
    slice_spacing: float


SMALL: Geometry = {"slices": 40, "rows": 160, "columns": 160, "pixel_spacing": 2.2, "slice_spacing": 7.0}


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
    assert "rejected" in table.stdout and "less than the 150.0 mm a chest needs" in table.stdout


def score_csv(*paths: Path) -> tuple[int, list[dict[str, str]]]:
    """`cttriage score PATH... --csv -`: its exit status and its rows."""
    result = subprocess.run([sys.executable, "-m", "app.cli", "score", *map(str, paths), "--csv", "-"],
                            capture_output=True, text=True, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, list(csv.DictReader(io.StringIO(result.stdout)))


def test_a_whole_chest_in_30_slices_of_8_mm_is_scored(tmp_path: Path) -> None:
    """A routine chest at 8 mm is 30 slices (240 mm): scored, whatever its slice count."""
    made = subprocess.run([sys.executable, "-m", "app.cli", "phantom", str(tmp_path / "chest"), "--slices", "30",
                           "--slice-spacing", "8", "--size", "160", "--pixel-spacing", "2.2", "--severity-left", "30",
                           "--severity-right", "10", "--seed", "74"], capture_output=True, text=True, timeout=120,
                          check=True)
    truth = json.loads(made.stdout)
    assert len(list((tmp_path / "chest").glob("*.dcm"))) == 30
    code, [row] = score_csv(tmp_path / "chest")
    assert code == 0 and row["state"] == "scored" and row["reason"] == "", row
    assert row["study_uid"] == truth["study_instance_uid"] and row["series_uid"] == truth["series_instance_uid"]
    assert abs(float(row["severity_left"]) - truth["severity_left"]) <= 3.0, row
    assert abs(float(row["severity_right"]) - truth["severity_right"]) <= 3.0, row
    assert float(row["severity"]) == max(float(row["severity_left"]), float(row["severity_right"]))


def test_real_single_slices_and_a_60_mm_series_are_rejected_for_coverage() -> None:
    """The shared real data: single chest slices and a 20-slice abdominal slab cover far less than a chest."""
    covid = SHARED_DATA / "real-dicom" / "covid19-ny-sbu"
    siemens = SHARED_DATA / "real-dicom" / "totalsegmentator-example-ct"
    if not (covid.is_dir() and siemens.is_dir()):
        pytest.skip(f"real data not present under {SHARED_DATA / 'real-dicom'}")
    code, rows = score_csv(covid, siemens)
    assert code == 1
    assert [r["state"] for r in rows] == ["rejected"] * 7, rows  # 6 studies of single slices, 1 series
    one_slice = re.compile(r"series 2 \(covers \d+\.\d mm along the head-foot axis, less than the 150\.0 mm a "
                           r"chest needs: 1 slice, \d+\.\d mm thick\)")
    assert all(one_slice.search(r["reason"]) for r in rows if r["source"] == str(covid)), rows
    [slab] = [r for r in rows if r["source"] == str(siemens)]
    assert slab["reason"] == ("no usable series: series (no number) (covers 41.0 mm along the head-foot axis, less "
                              "than the 150.0 mm a chest needs: 20 slices 2.0 mm apart, 3.0 mm thick)")


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
    rows = score_all(batch_items([broken, also_broken]), ThresholdPredictor(), criteria=SeriesCriteria())
    assert [(r.study_uid, r.state) for r in rows] == [("broken.nii.gz", "failed"), ("also.nii", "failed")]
    assert all(r.reason for r in rows)
