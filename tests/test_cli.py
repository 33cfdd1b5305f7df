"""The `cttriage` console script as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom


def test_phantom_command_writes_series_and_truth(tmp_path: Path) -> None:
    out = tmp_path / "ph"
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "phantom", str(out), "--slices", "40", "--size", "128",
         "--pixel-spacing", "2.8", "--severity-left", "20", "--severity-right", "5"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    truth = json.loads((out / "truth.json").read_text())
    assert json.loads(result.stdout)["study_instance_uid"] == truth["study_instance_uid"]
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 40 == truth["files"]
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "CT" and ds.Rows == 128
    assert abs(float(ds.SliceThickness) - 8.0) < 1e-6  # 320 mm of chest over 40 slices
    assert abs(truth["severity_left"] - 20) < 2 and abs(truth["severity_right"] - 5) < 2


def test_help_lists_every_process() -> None:
    result = subprocess.run([sys.executable, "-m", "app.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("serve", "api", "dicom", "worker", "migrate", "phantom", "push"):
        assert command in result.stdout
