"""The chest phantom: truth consistent with its masks, realistic anatomy, valid DICOM."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, JPEGBaseline8Bit
from scipy import ndimage

from models import phantom as ph
from models.lungs_threshold import LEFT_LUNG, RIGHT_LUNG
from models.phantom import PhantomSpec, phantom_volume
from models.phantom_dicom import (
    PIXEL_PADDING_VALUE,
    PhantomStudy,
    phantom_datasets,
    scout_dataset,
    thick_datasets,
    write_phantom,
)

# 128 x 128 at 2.8 mm covers the same 358 mm field as 512 x 0.7 mm; 48 x 5 mm covers the chest.
SMALL = PhantomSpec(rows=128, columns=128, pixel_spacing=2.8, slices=48, slice_spacing=5.0)


@pytest.fixture(scope="module")
def diseased() -> ph.PhantomVolume:
    return phantom_volume(replace(SMALL, severity_left=35.0, severity_right=8.0, seed=3))


@pytest.mark.parametrize(("left", "right"), [(0.0, 0.0), (5.0, 0.0), (35.0, 8.0), (0.0, 60.0), (80.0, 45.0)])
def test_truth_severity_close_to_target_and_counted_from_masks(left: float, right: float) -> None:
    p = phantom_volume(replace(SMALL, severity_left=left, severity_right=right, seed=int(left + right)))
    t = p.truth
    assert t["severity_left"] == pytest.approx(left, abs=1.0)
    assert t["severity_right"] == pytest.approx(right, abs=1.0)
    assert t["severity"] == max(t["severity_left"], t["severity_right"])
    ml = float(np.prod(p.spacing)) / 1000
    for name, side in (("left", LEFT_LUNG), ("right", RIGHT_LUNG)):
        lung = p.lungs == side
        assert t[f"lung_volume_{name}_ml"] == pytest.approx(lung.sum() * ml)
        assert t[f"lesion_volume_{name}_ml"] == pytest.approx((lung & (p.lesions > 0)).sum() * ml)
    assert not np.any((p.lesions > 0) & (p.lungs == 0)), "lesions must lie inside the lungs"
    assert t["ggo_volume_ml"] + t["consolidation_volume_ml"] == pytest.approx(
        t["lesion_volume_left_ml"] + t["lesion_volume_right_ml"]
    )
    json.dumps(t)  # JSON-safe


def test_consolidation_share_is_respected(diseased: ph.PhantomVolume) -> None:
    t = diseased.truth
    share = t["consolidation_volume_ml"] / (t["ggo_volume_ml"] + t["consolidation_volume_ml"])
    assert share == pytest.approx(0.3, abs=0.08)


def test_full_coverage_lungs_have_adult_volumes() -> None:
    # A 512 x 512 matrix at 0.7 mm over 300 mm of z: the lungs' full realistic height.
    p = phantom_volume(PhantomSpec(slices=40, slice_spacing=7.5))
    for name in ("left", "right"):
        assert 1500 <= p.truth[f"lung_volume_{name}_ml"] <= 3500
    assert p.truth["lung_volume_right_ml"] > p.truth["lung_volume_left_ml"]  # as in real chests


def test_lungs_are_whole_in_volume_and_do_not_touch(diseased: ph.PhantomVolume) -> None:
    lungs = diseased.lungs
    assert not lungs[0].any() and not lungs[-1].any(), "margin below the bases and above the apices"
    right, left = lungs == RIGHT_LUNG, lungs == LEFT_LUNG
    assert not np.any(ndimage.binary_dilation(right, iterations=2) & left), "mediastinum between the lungs"
    cols = np.arange(lungs.shape[2])
    assert cols[left.any(axis=(0, 1))].min() > cols[right.any(axis=(0, 1))].max(), "patient left at high columns"
    assert ndimage.label(right)[1] == 1 and ndimage.label(left)[1] == 1


def test_tissue_hounsfield_units_are_realistic(diseased: ph.PhantomVolume) -> None:
    hu, tissue, lesions = diseased.hu, diseased.tissue, diseased.lesions

    def median(mask: np.ndarray) -> float:
        return float(np.median(hu[mask]))

    assert median((tissue == ph.LUNG) & (lesions == 0)) == pytest.approx(-850, abs=10)
    assert median(lesions == ph.GGO) == pytest.approx(-600, abs=60)
    assert median(lesions == ph.CONSOLIDATION) == pytest.approx(-50, abs=30)
    assert median(tissue == ph.FAT) == pytest.approx(-100, abs=10)
    assert median(tissue == ph.SOFT_TISSUE) == pytest.approx(40, abs=10)
    assert median(tissue == ph.BONE) >= 400
    assert median(tissue == ph.AIRWAY_LUMEN) <= -980
    assert hu.dtype == np.int16 and hu.min() >= -1024


def test_airways_run_from_the_top_to_both_hila(diseased: ph.PhantomVolume) -> None:
    lumen = diseased.tissue == ph.AIRWAY_LUMEN
    top = np.nonzero(lumen[-1])
    assert top[0].size > 0, "trachea leaves the volume at the top"
    assert abs(top[1].mean() - (lumen.shape[2] - 1) / 2) < 3, "trachea in the midline"
    for side in (RIGHT_LUNG, LEFT_LUNG):
        assert np.any(lumen & (diseased.lungs == side)), "main bronchus reaches the hilum"


def test_vessels_are_present_but_a_small_share_of_the_lungs(diseased: ph.PhantomVolume) -> None:
    t = diseased.truth
    lung_ml = t["lung_volume_left_ml"] + t["lung_volume_right_ml"]
    assert 0 < t["vessel_volume_ml"] < 0.02 * lung_ml


def test_consolidation_keeps_clear_of_the_lung_boundary(diseased: ph.PhantomVolume) -> None:
    consolidation = diseased.lesions == ph.CONSOLIDATION
    assert consolidation.any()
    grown = ndimage.binary_dilation(consolidation, structure=ndimage.generate_binary_structure(3, 1))
    assert np.all(diseased.lungs[grown] > 0), "a lung voxel between every consolidation and the chest wall"


def test_generation_is_deterministic_per_seed() -> None:
    a, b = phantom_volume(replace(SMALL, severity_left=20.0)), phantom_volume(replace(SMALL, severity_left=20.0))
    c = phantom_volume(replace(SMALL, severity_left=20.0, seed=1))
    assert np.array_equal(a.hu, b.hu) and a.truth == b.truth
    assert not np.array_equal(a.hu, c.hu)


def test_without_noise_pixels_are_the_tissue_values() -> None:
    p = phantom_volume(replace(SMALL, noise_hu=0.0))
    inside = p.lesions == 0
    assert np.array_equal(p.hu[inside], ph.TISSUE_HU[p.tissue[inside]])


def test_datasets_are_valid_ct_instances(diseased: ph.PhantomVolume) -> None:
    spec = replace(SMALL, severity_left=35.0, severity_right=8.0, seed=3)
    datasets = phantom_datasets(diseased, spec, accession="ACC9", patient_id="PID9", patient_name="DOE^JANE")
    assert len(datasets) == spec.slices
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert z == sorted(z) and z[0] == pytest.approx(ph.FIRST_SLICE_Z_MM)
    assert len({ds.SOPInstanceUID for ds in datasets}) == spec.slices
    ds = datasets[0]
    assert ds.SOPClassUID == CTImageStorage and ds.Modality == "CT"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.file_meta.ImplementationClassUID and ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(ds.SliceThickness) == 5.0 and [float(v) for v in ds.PixelSpacing] == [2.8, 2.8]
    assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.PixelRepresentation) == (128, 128, 16, 1)
    assert ds.AccessionNumber == "ACC9" and ds.PatientID == "PID9" and ds.Manufacturer == "cttriage-phantom"
    for keyword in ("StudyDate", "StudyTime", "PatientBirthDate", "PatientSex", "KVP", "SeriesDescription"):
        assert keyword in ds
    stored = ds.pixel_array
    assert np.count_nonzero(stored == PIXEL_PADDING_VALUE) > 0, "padding outside the reconstruction circle"


def test_flip_lr_mirrors_the_stored_pixels(diseased: ph.PhantomVolume) -> None:
    spec = replace(SMALL, severity_left=35.0, severity_right=8.0, seed=3)
    plain = phantom_datasets(diseased, spec)[20]
    flipped = phantom_datasets(diseased, replace(spec, flip_lr=True))[20]
    assert [float(v) for v in flipped.ImageOrientationPatient][:3] == [-1, 0, 0]
    assert np.array_equal(flipped.pixel_array, plain.pixel_array[:, ::-1])
    assert float(flipped.ImagePositionPatient[0]) == pytest.approx(-float(plain.ImagePositionPatient[0]))


def test_write_phantom_writes_a_multi_series_study(tmp_path) -> None:
    spec = replace(SMALL, severity_right=12.0, thick_series_mm=10.0, scout=True)
    truth = write_phantom(tmp_path, spec, study_uid="1.2.3.4", series_uid="1.2.3.4.5")
    files = sorted(tmp_path.glob("IM*.dcm"))
    assert truth["files"] == len(files) == 48 + 24 + 1
    assert files[0].name == "IM0001.dcm"
    assert truth["study_instance_uid"] == "1.2.3.4" and truth["series_instance_uid"] == "1.2.3.4.5"
    assert json.loads((tmp_path / "truth.json").read_text()) == truth
    by_series: dict[str, list[pydicom.Dataset]] = {}
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.StudyInstanceUID == "1.2.3.4"
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    assert sorted(len(v) for v in by_series.values()) == [1, 24, 48]
    thick = next(v for v in by_series.values() if len(v) == 24)
    assert float(thick[0].SliceThickness) == 10.0 and int(thick[0].SeriesNumber) == 3
    scout = next(v for v in by_series.values() if len(v) == 1)[0]
    assert "LOCALIZER" in scout.ImageType and scout.pixel_array.shape == (48, 128)


def test_thick_series_need_not_be_a_multiple_of_the_thin_slices() -> None:
    spec = PhantomSpec(rows=32, columns=32, pixel_spacing=11.2, slices=40, slice_spacing=1.5)
    thick = thick_datasets(phantom_volume(spec), spec, 5.0, study=PhantomStudy("1.2.3"))
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in thick])
    assert len(thick) == 12 and np.allclose(np.diff(z), 5.0)
    assert {float(ds.SliceThickness) for ds in thick} == {5.0}


def test_scout_is_a_localizer_of_the_same_study(diseased: ph.PhantomVolume) -> None:
    spec = replace(SMALL, severity_left=35.0, severity_right=8.0, seed=3)
    ds = scout_dataset(diseased, spec, study=PhantomStudy("9.8.7"))
    assert ds.StudyInstanceUID == "9.8.7" and list(ds.ImageType)[2] == "LOCALIZER"


@pytest.mark.parametrize("slices", [2, 4, 7])
def test_a_few_slices_still_cut_through_both_lungs(slices: int) -> None:
    """Short coverages (the single-slice and small-series tests) squash the lungs, never lose them."""
    phantom = ph.phantom_volume(ph.PhantomSpec(slices=slices, rows=64, columns=64, noise_hu=0.0))
    assert phantom.hu.shape == (slices, 64, 64)
    for side in (RIGHT_LUNG, LEFT_LUNG):
        assert (phantom.lungs == side).any()


def test_unsupported_transfer_syntax_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="not supported by the phantom"):
        PhantomSpec(transfer_syntax=JPEGBaseline8Bit)


def test_mismatched_spec_is_refused(diseased: ph.PhantomVolume) -> None:
    with pytest.raises(ValueError, match="spec describes"):
        phantom_datasets(diseased, replace(SMALL, slices=10))
