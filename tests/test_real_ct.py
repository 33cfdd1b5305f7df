"""The weight-free method on real chest CT (issue 17's checks), on the scans in ../shared/data.

Each real case is scored the way a worker scores it: the A0001 series from its DICOM files
through series selection, the single COVID-19 slices (a series of one is rejected) repeated
40 times along z at 5 mm. Dense lung and fluid against the chest wall are painted into A0001
on the scoring grid, where the answer is known.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.implant_io import implant_series, read_series
from app.series_selection import SeriesCriteria
from models.findings import (
    BILATERAL_MIN_PERCENT,
    LUNG_MASK_IMPLAUSIBLE,
    PARTIAL_COVERAGE,
    POSSIBLE_EFFUSION,
    describe_lesions,
)
from models.lesions_threshold import VERSION_1_PARAMS, segment_lesions, segment_lesions_paper
from models.lungs_threshold import LEFT_LUNG, RIGHT_LUNG
from models.predictor import ThresholdPredictor
from models.preprocessing import resample_inplane
from models.priority import LOWER_BOUND_MIN_BAND, effective_band
from models.severity import lung_severity
from models.threshold_method import threshold_lungs
from models.volume import CtVolume, hu_volume
from tests.conftest import SHARED_DATA, stacked_real_slice
from worker.batch_scoring import dicom_items
from worker.pipeline import StudyScore, score_study, score_volume

A0001 = SHARED_DATA / "real-dicom" / "lung-pet-ct-dx-A0001"
AXES = ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0))


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real test data not present at {path} (see ../shared/data/README.md)")
    return path


def codes(score: StudyScore) -> set[str]:
    return {flag.code for flag in score.flags}


@pytest.fixture(scope="module")
def a0001() -> dict[str, StudyScore]:
    """Both reconstructions of A0001, scored from their files like a worker does."""
    scores = {}
    for kernel in ("kernel-L", "kernel-B"):
        [item] = list(dicom_items(require(A0001 / kernel)))
        assert item.slices is not None and item.paths is not None
        scores[kernel] = score_study(item.slices, item.paths, ThresholdPredictor(2.0), criteria=SeriesCriteria())
    return scores


@pytest.fixture(scope="module")
def a0001_grid() -> tuple[np.ndarray, tuple[float, float, float]]:
    """A0001 kernel-L on the 2 mm scoring grid."""
    volume = hu_volume(read_series(require(A0001 / "kernel-L")))
    return resample_inplane(volume.hu, volume.spacing)


def stacked(name: str) -> StudyScore:
    """One real axial slice repeated 40 times along z at 5 mm, scored."""
    return score_volume(name, stacked_real_slice(name), ThresholdPredictor(2.0))


def test_a_normal_chest_with_a_hilar_mass_scores_a_few_percent_with_either_kernel(a0001: dict[str, StudyScore]) -> None:
    for kernel, score in a0001.items():
        assert score.severity.severity_right <= 2.0, kernel
        assert score.severity.severity_left <= 4.0, kernel  # the hilar mass is a few percent of the left lung
        assert not codes(score), f"{kernel}: {score.flags}"
        assert score.model_version == "threshold-2.0"
    sharp, smooth = a0001["kernel-L"].severity, a0001["kernel-B"].severity
    assert abs(sharp.severity_right - smooth.severity_right) <= 1.5
    assert abs(sharp.severity_left - smooth.severity_left) <= 1.5
    assert sharp.lung_volume_right_ml == pytest.approx(smooth.lung_volume_right_ml, rel=0.02)


def test_vessels_and_dependent_lung_are_what_the_first_version_counted(
        a0001_grid: tuple[np.ndarray, tuple[float, float, float]]) -> None:
    hu, spacing = a0001_grid
    labels = threshold_lungs(hu, spacing).lung_labels
    ours = lung_severity(labels, segment_lesions(hu, labels, spacing), spacing)
    first = lung_severity(labels, segment_lesions_paper(hu, labels > 0, spacing, VERSION_1_PARAMS), spacing)
    assert first.severity_right > 3 * max(ours.severity_right, 0.5)
    assert first.severity_left > 1.5 * ours.severity_left


@pytest.mark.parametrize("lung", ["left", "right"])
def test_implanted_ground_glass_reads_as_ground_glass_on_one_side(lung: str) -> None:
    implanted = implant_series(read_series(require(A0001 / "kernel-L")), lung=lung, fraction=0.2, seed=0)
    score = score_volume("implanted", hu_volume(implanted.datasets), ThresholdPredictor(2.0))
    assert score.descriptors is not None
    side = getattr(score.descriptors, lung)
    assert side.ground_glass_share is not None and side.ground_glass_share >= 0.8
    assert 1 <= side.foci <= 3
    other = score.severity.severity_right if lung == "left" else score.severity.severity_left
    assert score.descriptors.bilateral == (other >= BILATERAL_MIN_PERCENT)  # the left lung holds the mass


def test_a_patch_in_one_lung_beside_a_normal_lung() -> None:
    score = stacked("A098752_axial_19001231-32")
    assert score.severity.severity_left <= 8.0, "the normal lung"
    assert 5.0 <= score.severity.severity_right <= 25.0, "a 10-15 % patch"
    assert PARTIAL_COVERAGE in codes(score), "one slice repeated reaches neither apex nor base"


def test_diffuse_ground_glass_stays_high() -> None:
    assert stacked("A098752_axial_19010127-128").severity.severity_left >= 40.0


def test_a_white_hemithorax_is_flagged_and_never_ranked_low() -> None:
    score = stacked("A072894_axial_19010103-40")
    [flag] = [f for f in score.flags if f.code == LUNG_MASK_IMPLAUSIBLE]
    assert flag.lower_bound and "left lung" in flag.message
    assert score.severity_lower_bound
    assert effective_band(score.severity.severity, score.severity_lower_bound) >= LOWER_BOUND_MIN_BAND


def paint_lens(hu: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float], side: int, value: float,
               *, posterior: bool) -> tuple[np.ndarray, np.ndarray]:
    """A 15 mm half-disc of ``value`` HU over five mid-lung slices, against the lateral (or the
    posterior) chest wall of one lung: a dense dent the threshold alone leaves outside the lung."""
    out, painted = hu.copy(), np.zeros(hu.shape, dtype=bool)
    rng = np.random.default_rng(0)
    slices = np.flatnonzero((labels == side).any(axis=(1, 2)))
    middle = int(slices[len(slices) // 2])
    rows, cols = np.mgrid[: hu.shape[1], : hu.shape[2]]
    for k in range(middle - 2, middle + 3):
        lung = labels[k] == side
        ys, xs = np.nonzero(lung)
        if posterior:
            x = int(np.median(xs))
            y = int(np.flatnonzero(lung[:, x])[-1])
        else:
            y = int(np.median(ys))
            row = np.flatnonzero(lung[y])
            x = int(row[0] if side == RIGHT_LUNG else row[-1])
        region = lung & (((rows - y) * spacing[1]) ** 2 + ((cols - x) * spacing[2]) ** 2 <= 15.0**2)
        out[k][region] = value + rng.normal(0.0, 8.0, int(region.sum()))
        painted[k] = region
    return out, painted


def score_grid(hu: np.ndarray, spacing: tuple[float, float, float]) -> StudyScore:
    return score_volume("painted", CtVolume(hu, spacing, (0.0, 0.0, 0.0), AXES), ThresholdPredictor(2.0))


def test_consolidation_against_the_chest_wall_is_lung_and_lesion(
        a0001_grid: tuple[np.ndarray, tuple[float, float, float]]) -> None:
    hu, spacing = a0001_grid
    labels = threshold_lungs(hu, spacing).lung_labels
    painted_hu, painted = paint_lens(hu, labels, spacing, RIGHT_LUNG, 35.0, posterior=False)
    before = threshold_lungs(painted_hu, spacing)
    score = score_grid(painted_hu, spacing)
    assert score.masks is not None
    inside = score.masks.lung_labels[painted] == RIGHT_LUNG
    assert inside.mean() >= 0.8, "the dense dent is given back to the lung"
    assert score.masks.lesions[painted].mean() >= 0.6, "and counted as lesion"
    assert before.added_ml["right"] >= 5.0 and POSSIBLE_EFFUSION not in codes(score)


def test_pleural_fluid_is_set_apart_and_said(a0001_grid: tuple[np.ndarray, tuple[float, float, float]]) -> None:
    hu, spacing = a0001_grid
    labels = threshold_lungs(hu, spacing).lung_labels
    painted_hu, painted = paint_lens(hu, labels, spacing, LEFT_LUNG, 8.0, posterior=True)
    score = score_grid(painted_hu, spacing)
    assert score.masks is not None
    assert (score.masks.lung_labels[painted] > 0).mean() <= 0.2, "fluid is not lung"
    [flag] = [f for f in score.flags if f.code == POSSIBLE_EFFUSION]
    assert "left lung" in flag.message and not flag.lower_bound


def test_descriptors_measure_where_how_dense_and_how_many() -> None:
    spacing = (5.0, 2.0, 2.0)
    labels = np.zeros((10, 60, 80), dtype=np.uint8)
    labels[:, 10:50, 5:35] = RIGHT_LUNG
    labels[:, 10:50, 45:75] = LEFT_LUNG
    hu = np.where(labels > 0, -850.0, 40.0).astype(np.float32)
    lesions = np.zeros(labels.shape, dtype=bool)
    lesions[3:5, 10:13, 10:20] = True  # right: one ground-glass focus against the border
    hu[lesions] = -550.0
    lesions[2:8, 26:34, 55:63] = True  # left: a consolidation deep in the lung ...
    hu[2:8, 26:34, 55:63] = 20.0
    lesions[2:4, 10:12, 70:75] = True  # ... and a ground-glass focus at its border
    hu[2:4, 10:12, 70:75] = -600.0
    found = describe_lesions(hu, labels, lesions, spacing)
    assert found.right.foci == 1 and found.right.peripheral_share == 1.0 and found.right.ground_glass_share == 1.0
    assert found.left.foci == 2
    # the 3 x 3 median that keeps noise from reading as consolidation rounds the block's corners
    assert found.left.consolidation_share == pytest.approx(384 / 404, abs=0.06)
    assert found.left.peripheral_share == pytest.approx(20 / 404, abs=0.01)
    assert found.right.lesion_volume_ml == pytest.approx(60 * 0.02)
    assert found.bilateral is False  # 0.5 % of the right lung is below BILATERAL_MIN_PERCENT
    lesions[:, 30:40, 5:35] = True
    assert describe_lesions(hu, labels, lesions, spacing).bilateral is True
