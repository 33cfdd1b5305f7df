"""The weight-free pipeline on phantoms (against exact truth) and on real anatomy.

hu_volume -> resample_inplane (2 mm) -> segment_lungs -> split_lungs -> segment_lesions ->
lung_severity, from DICOM instances as the worker will run it.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pydicom
import pytest
from scipy import ndimage
from scipy.stats import spearmanr

from models import phantom as ph
from models.errors import SegmentationError
from models.lesions_threshold import PAPER_BASELINE, segment_lesions, segment_lesions_paper
from models.lungs_threshold import LEFT_LUNG, RIGHT_LUNG, segment_lungs, split_lungs
from models.phantom import PhantomSpec, phantom_volume
from models.phantom_dicom import phantom_datasets
from models.preprocessing import resample_inplane, window
from models.severity import LungSeverity, lung_severity, max_lung_severity
from models.volume import hu_volume
from tests.conftest import stacked_real_slice

SMALL = PhantomSpec(rows=128, columns=128, pixel_spacing=2.8, slices=48, slice_spacing=5.0)


def run_pipeline(datasets: list[pydicom.Dataset]) -> LungSeverity:
    volume = hu_volume(datasets)
    hu, spacing = resample_inplane(volume.hu, volume.spacing)
    lungs = segment_lungs(hu, spacing)
    return lung_severity(split_lungs(lungs, spacing), segment_lesions(hu, lungs, spacing), spacing)


def scored(spec: PhantomSpec) -> tuple[dict, LungSeverity]:
    phantom = phantom_volume(spec)
    return phantom.truth, run_pipeline(phantom_datasets(phantom, spec))


def assert_close_to_truth(truth: dict, got: LungSeverity) -> None:
    for side in ("left", "right"):
        assert getattr(got, f"severity_{side}") == pytest.approx(truth[f"severity_{side}"], abs=3.0), side
        assert getattr(got, f"lung_volume_{side}_ml") == pytest.approx(truth[f"lung_volume_{side}_ml"], rel=0.05), side


@pytest.mark.parametrize(
    ("spec", "sick", "healthy"),
    [
        (replace(SMALL, severity_left=30.0, seed=11), "left", "right"),
        (replace(SMALL, severity_right=40.0, flip_lr=True, seed=12), "right", "left"),
    ],
    ids=["left-diseased", "right-diseased-mirrored"],
)
def test_one_diseased_lung_is_scored_on_its_own_side(spec: PhantomSpec, sick: str, healthy: str) -> None:
    truth, got = scored(spec)
    assert_close_to_truth(truth, got)
    assert getattr(got, f"severity_{sick}") > 25.0
    assert getattr(got, f"severity_{healthy}") < 1.0, "left and right swapped"
    assert got.severity == max(got.severity_left, got.severity_right)


def test_healthy_phantom_scores_below_one_percent() -> None:
    truth, got = scored(replace(SMALL, seed=13))
    assert got.severity < 1.0
    assert got.lung_volume_left_ml == pytest.approx(truth["lung_volume_left_ml"], rel=0.05)


def test_full_resolution_512_series() -> None:
    truth, got = scored(PhantomSpec(slices=40, slice_spacing=7.5, severity_left=25.0, severity_right=10.0, seed=14))
    assert_close_to_truth(truth, got)


def test_twenty_phantoms_rank_and_measure_severity() -> None:
    """20 small phantoms from 0 to 80 %: Spearman rho >= 0.95 and mean absolute error <= 3 points."""
    rng = np.random.default_rng(2021)
    targets = np.linspace(0.0, 80.0, 20)
    truth, predicted = [], []
    for i, target in enumerate(targets):
        other = float(rng.uniform(0.0, target))
        left, right = (target, other) if i % 2 else (other, target)
        spec = replace(SMALL, slices=40, slice_spacing=6.0, severity_left=left, severity_right=right, seed=100 + i)
        t, got = scored(spec)
        truth += [t["severity_left"], t["severity_right"]]
        predicted += [got.severity_left, got.severity_right]
    truth_arr, predicted_arr = np.array(truth), np.array(predicted)
    assert spearmanr(truth_arr, predicted_arr)[0] >= 0.95
    assert spearmanr(truth_arr[::2].clip(truth_arr[1::2]), predicted_arr[::2].clip(predicted_arr[1::2]))[0] >= 0.95
    assert float(np.abs(truth_arr - predicted_arr).mean()) <= 3.0


# --- lungs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def healthy() -> ph.PhantomVolume:
    return phantom_volume(replace(SMALL, seed=21))


def test_split_lungs_separates_lungs_that_touch(healthy: ph.PhantomVolume) -> None:
    truth = healthy.lungs
    mask = truth > 0
    bridged = mask.copy()
    mid = mask.shape[2] // 2
    bridged[15:30, 60:66, mid - 10 : mid + 10] = True  # lungs fused over 15 slices (a junction line)
    assert ndimage.label(bridged)[1] == 1
    labels = split_lungs(bridged, healthy.spacing)
    agree = np.mean(labels[mask] == truth[mask])
    assert agree > 0.98
    assert np.nonzero(labels == RIGHT_LUNG)[2].mean() < np.nonzero(labels == LEFT_LUNG)[2].mean()


def test_split_lungs_with_a_wide_contact_splits_at_the_midline_valley() -> None:
    """Fused over their whole height by a band too thick to erode away: the profile valley decides."""
    mask = np.zeros((40, 90, 130), bool)
    z, y, x = np.ogrid[:40, :90, :130]
    for cx in (35, 95):
        mask |= ((x - cx) / 25) ** 2 + ((y - 45) / 35) ** 2 + ((z - 20) / 30) ** 2 <= 1
    mask[5:35, 33:57, 35:95] = True
    labels = split_lungs(mask, (2.0, 2.0, 2.0))
    assert np.all(labels[:, :, :58][mask[:, :, :58]] == RIGHT_LUNG)
    assert np.all(labels[:, :, 72:][mask[:, :, 72:]] == LEFT_LUNG)


def test_split_lungs_keeps_a_single_lung_on_its_side(healthy: ph.PhantomVolume) -> None:
    only_left = healthy.lungs == LEFT_LUNG
    labels = split_lungs(only_left, healthy.spacing)
    assert np.all(labels[only_left] == LEFT_LUNG) and not labels[~only_left].any()
    assert not split_lungs(np.zeros((4, 4, 4), bool), (1.0, 1.0, 1.0)).any()


def test_segment_lungs_excludes_trachea_and_includes_vessels(healthy: ph.PhantomVolume) -> None:
    hu = healthy.hu.astype(np.float32)
    lungs = segment_lungs(hu, healthy.spacing)
    trachea = (healthy.tissue == ph.AIRWAY_LUMEN) & (healthy.lungs == 0)
    assert np.mean(lungs[trachea]) < 0.05
    vessels = healthy.tissue == ph.VESSEL
    assert np.mean(lungs[vessels]) > 0.95
    assert not lungs[healthy.tissue == ph.SOFT_TISSUE].mean() > 0.01


def test_no_lungs_is_a_segmentation_error(healthy: ph.PhantomVolume) -> None:
    hu = healthy.hu.astype(np.float32)
    hu[healthy.lungs > 0] = 40.0  # all lung tissue turned to soft tissue: only the trachea is left
    with pytest.raises(SegmentationError, match="lungs implausibly small: 0.0. L found"):
        segment_lungs(hu, healthy.spacing)
    with pytest.raises(SegmentationError, match="no air-filled region"):
        segment_lungs(np.full((8, 32, 32), 40.0, np.float32), (5.0, 2.0, 2.0))


def real_stack(name: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """One real axial slice repeated 40 times along z, at 2 mm."""
    volume = stacked_real_slice(name)
    return resample_inplane(volume.hu, volume.spacing)


def test_real_chest_slice_gives_two_lungs_on_the_right_sides() -> None:
    hu, spacing = real_stack("A098752_axial_19010127-128")
    lungs = segment_lungs(hu, spacing)
    labels = split_lungs(lungs, spacing)
    right, left = labels == RIGHT_LUNG, labels == LEFT_LUNG
    ml = float(np.prod(spacing)) / 1000
    assert right.sum() * ml > 500 and left.sum() * ml > 500
    assert np.nonzero(right)[2].mean() < hu.shape[2] / 2 < np.nonzero(left)[2].mean()
    assert float(np.median(hu[lungs])) < -500, "the mask is mostly aerated lung"


def test_real_abdomen_slice_has_no_lungs() -> None:
    hu, spacing = real_stack("A027284_axial_19000925-116")
    with pytest.raises(SegmentationError, match="implausibly small"):
        segment_lungs(hu, spacing)


# --- lesions ---------------------------------------------------------------------------------


def test_vessels_are_not_lesions(healthy: ph.PhantomVolume) -> None:
    hu, spacing = resample_inplane(healthy.hu, healthy.spacing)
    lungs = segment_lungs(hu, spacing)
    lesions = segment_lesions(hu, lungs, spacing)
    assert lesions.sum() < 0.01 * lungs.sum()
    raw = segment_lesions_paper(hu, lungs, spacing, replace(PAPER_BASELINE, sigma_mm=0.0, min_component_fraction=0.0))
    assert raw.sum() > lesions.sum(), "without blur the band catches vessels and rims"


def test_lesions_stay_inside_the_lung_mask_and_paper_baseline_runs() -> None:
    phantom = phantom_volume(replace(SMALL, severity_left=40.0, seed=31))
    hu, spacing = resample_inplane(phantom.hu, phantom.spacing)
    lungs = segment_lungs(hu, spacing)
    ours = segment_lesions(hu, lungs, spacing)
    paper = segment_lesions_paper(hu, lungs, spacing)
    assert not np.any(ours & ~lungs) and not np.any(paper & ~lungs)
    paper_values = (PAPER_BASELINE.hu_min, PAPER_BASELINE.hu_max, PAPER_BASELINE.min_component_fraction)
    assert paper_values == (-700.0, 300.0, 0.001)
    labels = split_lungs(lungs, spacing)
    for mask in (ours, paper):
        severity = lung_severity(labels, mask, spacing).severity_left
        assert severity == pytest.approx(phantom.truth["severity_left"], abs=8.0)
    with pytest.raises(ValueError, match="differ in shape"):
        segment_lesions(hu, lungs[:-1], spacing)


# --- preprocessing and severity ------------------------------------------------------------------


def test_resample_inplane_to_two_millimetres() -> None:
    hu = np.random.default_rng(0).normal(-500, 100, (5, 512, 512)).astype(np.float32)
    out, spacing = resample_inplane(hu, (1.5, 0.7, 0.7))
    assert out.shape == (5, 179, 179) and out.dtype == np.float32
    assert spacing[0] == 1.5 and spacing[1] == pytest.approx(512 * 0.7 / 179)
    assert float(out.mean()) == pytest.approx(float(hu.mean()), abs=2.0)
    same, same_spacing = resample_inplane(out, spacing, target=(spacing[1], spacing[2]))
    assert same is out or np.array_equal(same, out)
    with pytest.raises(ValueError):
        resample_inplane(hu[0], (0.7, 0.7, 0.7))


def test_window_maps_the_paper_range_to_unit_interval() -> None:
    out = window(np.array([-2000.0, -1000.0, -350.0, 300.0, 1000.0]))
    assert out.dtype == np.float32
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])


def test_lung_severity_per_lung_and_max() -> None:
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:, :, :5] = RIGHT_LUNG
    labels[:, :, 5:] = LEFT_LUNG
    lesions = np.zeros_like(labels, dtype=bool)
    lesions[:5, :, :5] = True  # half of the right lung
    lesions[:1, :, 5:] = True  # a tenth of the left lung
    lesions[:, :, :] &= labels > 0
    s = lung_severity(labels, lesions, (2.0, 1.0, 1.0))
    assert (s.severity_right, s.severity_left, s.severity) == pytest.approx((50.0, 10.0, 50.0))
    assert s.lung_volume_right_ml == pytest.approx(1.0) and s.lesion_volume_left_ml == pytest.approx(0.1)
    assert lung_severity(np.zeros_like(labels), lesions, (1.0, 1.0, 1.0)).severity == 0.0
    assert max_lung_severity(3.0, 7.5) == 7.5
