"""Ground-glass implants of known volume (models/implant.py, `cttriage implant`) and the accuracy
check they make possible on real anatomy: the severity rise equals the implanted fraction."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from app.cli import main
from app.implant_io import TRUTH_FILE, implant_series, read_series
from models.implant import (
    TAPER_TOP_HU,
    implant_ground_glass,
    labels_to_source_grid,
    source_grid_lung_labels,
)
from models.lungs_threshold import LEFT_LUNG, RIGHT_LUNG
from models.predictor import ThresholdPredictor
from models.preprocessing import resample_inplane
from models.volume import CtVolume, hu_volume
from tests.conftest import SHARED_DATA
from worker.pipeline import StudyScore, score_volume

A0001_L = SHARED_DATA / "real-dicom" / "lung-pet-ct-dx-A0001" / "kernel-L"
SPACING = (5.0, 1.5, 1.5)


def two_lungs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small synthetic chest: two box lungs of noisy parenchyma, dense vessels, a dense mass."""
    rng = np.random.default_rng(seed)
    hu = np.full((16, 48, 64), 40.0, dtype=np.float32)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[2:14, 8:40, 4:28] = RIGHT_LUNG
    labels[2:14, 8:40, 36:60] = LEFT_LUNG
    lung = labels > 0
    hu[lung] = -850.0 + rng.normal(0.0, 40.0, int(lung.sum()))
    hu[:, 20, :] = np.where(lung[:, 20, :], 40.0, hu[:, 20, :])  # a "vessel" plane through both lungs
    hu[6:10, 26:34, 44:52] = 30.0  # a mass in the left lung (12 x 12 mm x 20 mm)
    return hu, labels


# --- pure functions -------------------------------------------------------------------------


@pytest.mark.parametrize("lung,fraction", [("left", 0.1), ("left", 0.35), ("right", 0.2)])
def test_implant_has_the_asked_volume_in_the_chosen_lung_only(lung: str, fraction: float) -> None:
    hu, labels = two_lungs()
    out = implant_ground_glass(hu, SPACING, labels, lung=lung, fraction=fraction, seed=3)
    side = LEFT_LUNG if lung == "left" else RIGHT_LUNG
    voxel_ml = float(np.prod(SPACING)) / 1000
    lung_voxels = int(np.count_nonzero(labels == side))
    assert abs(out.truth.implanted_voxels - fraction * lung_voxels) <= 1
    assert int(out.region.sum()) == out.truth.implanted_voxels
    assert out.truth.implanted_volume_ml == pytest.approx(out.truth.implanted_voxels * voxel_ml)
    assert out.truth.lung_volume_ml == pytest.approx(lung_voxels * voxel_ml)
    assert abs(out.truth.fraction - fraction) <= 1 / lung_voxels
    assert out.truth.severity_rise == pytest.approx(100 * out.truth.fraction)
    assert np.all(labels[out.region] == side)
    assert not out.delta[labels != side].any(), "only the chosen lung changes"
    assert not out.delta[~out.region].any()
    assert out.delta.min() >= 0 and out.delta.max() <= out.truth.hu_max


def test_dense_voxels_are_untouched_and_parenchyma_becomes_ground_glass() -> None:
    hu, labels = two_lungs()
    out = implant_ground_glass(hu, SPACING, labels, lung="left", fraction=0.5, seed=1, hu_range=(250, 350))
    assert not out.delta[hu >= TAPER_TOP_HU].any(), "vessels and masses keep their HU"
    assert not out.region[6:10, 26:34, 44:52].any(), "the mass is already dense: not part of the new disease"
    full = out.region & (hu <= -600)  # full taper weight
    assert full.sum() > 1000
    assert out.delta[full].min() >= 250 - 1e-3 and out.delta[full].max() <= 350 + 1e-3
    assert np.ptp(out.delta[full]) > 50, "a texture, not a constant"
    after = hu + out.delta
    assert -700 < float(np.median(after[full])) < -450


def test_the_implant_is_deterministic_given_the_seed() -> None:
    hu, labels = two_lungs()
    a = implant_ground_glass(hu, SPACING, labels, lung="right", fraction=0.2, seed=7)
    b = implant_ground_glass(hu, SPACING, labels, lung="right", fraction=0.2, seed=7)
    c = implant_ground_glass(hu, SPACING, labels, lung="right", fraction=0.2, seed=8)
    assert np.array_equal(a.delta, b.delta) and a.truth == b.truth
    assert not np.array_equal(a.delta, c.delta)


def test_implant_refuses_bad_arguments() -> None:
    hu, labels = two_lungs()
    for kwargs, match in (({"lung": "middle", "fraction": 0.1}, "left' or 'right"),
                          ({"lung": "left", "fraction": 0.0}, "fraction"),
                          ({"lung": "left", "fraction": 1.0}, "healthy part")):
        with pytest.raises(ValueError, match=match):
            implant_ground_glass(hu, SPACING, labels, **kwargs)  # type: ignore[arg-type]


def test_labels_map_back_to_the_source_grid_by_nearest_neighbour() -> None:
    hu = np.zeros((3, 20, 30), dtype=np.float32)
    hu[:, 4:12, 6:21] = 1.0
    spacing = (5.0, 0.8, 0.8)
    resampled, grid_spacing = resample_inplane(hu, spacing)
    assert resampled.shape == (3, 8, 12)
    back = labels_to_source_grid((resampled > 0.5).astype(np.uint8), hu.shape, spacing)
    assert back.shape == hu.shape
    assert np.mean(back == hu) > 0.9  # up to half a coarse voxel at each edge
    ramp = np.arange(12, dtype=np.uint8)[None, None, :].repeat(8, 1).repeat(3, 0)
    cols = labels_to_source_grid(ramp, hu.shape, spacing)[0, 0]
    centres_mm = (np.arange(30) + 0.5) * 0.8
    assert np.array_equal(cols, np.floor(centres_mm / grid_spacing[2]).astype(int))


# --- on the real chest CT ---------------------------------------------------------------------


@dataclass(frozen=True)
class RealSeries:
    datasets: list[pydicom.Dataset]
    volume: CtVolume
    score: StudyScore


@pytest.fixture(scope="module")
def a0001() -> RealSeries:
    if not A0001_L.is_dir():
        pytest.skip(f"real test data not present at {A0001_L}")
    datasets = read_series(A0001_L)
    volume = hu_volume(datasets)
    return RealSeries(datasets, volume, score_volume("A0001-L", volume, ThresholdPredictor(2.0)))


def test_cli_writes_a_new_series_that_reads_back_as_original_plus_delta(a0001: RealSeries, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "implanted"
    assert main(["implant", str(A0001_L), str(out), "--fraction", "0.2", "--lung", "left", "--seed", "5"]) == 0
    truth = json.loads((out / TRUTH_FILE).read_text())
    assert json.loads(capsys.readouterr().out) == truth
    labels = source_grid_lung_labels(a0001.volume.hu, a0001.volume.spacing)
    expected = implant_ground_glass(a0001.volume.hu, a0001.volume.spacing, labels, lung="left", fraction=0.2, seed=5)
    assert truth["implanted_voxels"] == expected.truth.implanted_voxels
    assert truth["lung"] == "left" and truth["seed"] == 5 and (truth["hu_min"], truth["hu_max"]) == (250, 350)
    assert truth["fraction"] == pytest.approx(0.2, abs=1e-4)

    written = [pydicom.dcmread(p) for p in sorted(out.glob("*.dcm"))]
    back = hu_volume(written)
    assert back.hu.shape == a0001.volume.hu.shape and back.spacing == a0001.volume.spacing
    assert back.origin == a0001.volume.origin and back.direction == a0001.volume.direction
    error = np.abs(back.hu - (a0001.volume.hu + expected.delta))
    assert float(error.max()) <= 1.0
    assert int(np.count_nonzero(back.hu != a0001.volume.hu)) > 0.5 * expected.truth.implanted_voxels

    source = a0001.datasets[0]
    assert {str(ds.StudyInstanceUID) for ds in written} == {str(source.StudyInstanceUID)}
    assert len({str(ds.SeriesInstanceUID) for ds in written}) == 1
    assert written[0].SeriesInstanceUID != source.SeriesInstanceUID
    assert truth["series_uid"] == written[0].SeriesInstanceUID
    assert truth["source_series_uid"] == source.SeriesInstanceUID
    new_sops = {str(ds.SOPInstanceUID) for ds in written}
    assert len(new_sops) == len(written) and not new_sops & {str(ds.SOPInstanceUID) for ds in a0001.datasets}
    assert all(ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID for ds in written)
    assert all(ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian for ds in written)
    assert str(written[0].SeriesDescription).endswith(" implant GGO 20% left")
    assert written[0].ImageType[0] == "DERIVED"


@pytest.mark.parametrize("content", [b"not a dicom file at all\n", None])
def test_cli_refuses_what_is_not_a_dicom_series_in_one_line(tmp_path: Path, content: bytes | None,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "input"
    if content is not None:
        source.mkdir()
        (source / "notes.txt").write_bytes(content)
    assert main(["implant", str(source), str(tmp_path / "out"), "--fraction", "0.1", "--lung", "right"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cttriage implant: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fraction", [0.10, 0.20, 0.35])
def test_implanted_ground_glass_raises_severity_by_the_implanted_fraction(a0001: RealSeries, fraction: float) -> None:
    """Issue 17 item 7: the severity rise of the implanted lung matches the truth within 2 points."""
    result = implant_series(a0001.datasets, lung="left", fraction=fraction, seed=0)
    after = score_volume("implanted", hu_volume(result.datasets), ThresholdPredictor(2.0))
    rise = after.severity.severity_left - a0001.score.severity.severity_left
    assert rise == pytest.approx(100 * result.implant.truth.fraction, abs=2.0)
    other = after.severity.severity_right - a0001.score.severity.severity_right
    assert abs(other) < 0.5, "the other lung is not touched"
