"""hu_volume and slice_headers: exact HU, canonical orientation, and a typed error per defect."""

from __future__ import annotations

import io
import json
import random
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from models.dicom_headers import SliceHeader, slice_headers
from models.errors import (
    DuplicatePositionError,
    GantryTiltError,
    MissingPixelDataError,
    MixedGeometryError,
    PixelDecodeError,
    SliceGapError,
    VolumeError,
)
from models.phantom import PhantomSpec, phantom_volume
from models.phantom_dicom import enhanced_dataset, phantom_datasets, write_phantom
from models.volume import AIR_HU, hu_volume

SMALL = PhantomSpec(rows=128, columns=128, pixel_spacing=2.8, slices=48, slice_spacing=5.0, severity_left=25.0, seed=7)
TINY = PhantomSpec(rows=64, columns=64, pixel_spacing=5.6, slices=12, slice_spacing=5.0)
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-dicom"
PATIENT_WORDS = ("PHANTOM", "CHEST^", "PH0001")


@pytest.fixture(scope="module")
def small():
    return phantom_volume(SMALL)


@pytest.fixture(scope="module")
def tiny():
    return phantom_volume(TINY)


def _roundtrip(ds: Dataset) -> Dataset:
    """Encode to file bytes and read back, as the listener would store and the worker read."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def _expected(phantom) -> np.ndarray:
    return phantom.hu.astype(np.float32)


def test_round_trip_from_written_files(tmp_path, small) -> None:
    write_phantom(tmp_path, SMALL)
    volume = hu_volume([pydicom.dcmread(f) for f in sorted(tmp_path.glob("IM*.dcm"))])
    assert volume.hu.dtype == np.float32 and volume.hu.flags.c_contiguous
    assert np.array_equal(volume.hu, _expected(small))
    assert volume.spacing == pytest.approx((5.0, 2.8, 2.8))
    assert volume.direction == ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0))
    assert volume.origin[2] == pytest.approx(-350.0)
    assert volume.hu[0, 0, 0] == AIR_HU, "padding outside the reconstruction circle becomes air"


@pytest.mark.parametrize("flip_lr", [False, True])
@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_canonical_orientation_whatever_the_storage(small, flip_lr: bool, order: str) -> None:
    datasets = phantom_datasets(small, replace(SMALL, flip_lr=flip_lr))
    if order == "reversed":
        datasets = datasets[::-1]
    else:
        random.Random(1).shuffle(datasets)
    volume = hu_volume(datasets)
    assert np.array_equal(volume.hu, _expected(small))
    assert volume.direction[2] == (1.0, 0.0, 0.0), "axis 2 runs to the patient's left"


def test_transposed_and_upside_down_storage_is_reoriented(tiny) -> None:
    """Rows along x and columns running anterior: the loader must permute and flip axes."""
    datasets = phantom_datasets(tiny, TINY)
    for ds in datasets:
        pixels = ds.pixel_array[::-1, :].T  # stored[c, r]: rows follow +x, columns follow -y
        ds.ImageOrientationPatient = [0.0, -1.0, 0.0, 1.0, 0.0, 0.0]
        x0, y0, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x0, -y0, z]
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    volume = hu_volume(datasets)
    assert np.array_equal(volume.hu, _expected(tiny))


ALL_SYNTAXES = [
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
]


@pytest.mark.parametrize("syntax", ALL_SYNTAXES)
def test_every_supported_transfer_syntax_decodes_to_the_same_hu(tiny, syntax: str) -> None:
    spec = replace(TINY, transfer_syntax=syntax)
    datasets = [_roundtrip(ds) for ds in phantom_datasets(tiny, spec)]
    assert datasets[0].file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(hu_volume(datasets).hu, _expected(tiny))


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, RLELossless])
def test_enhanced_ct_multiframe_loads_like_the_classic_series(tiny, syntax: str) -> None:
    spec = replace(TINY, transfer_syntax=syntax, flip_lr=True)
    ds = _roundtrip(enhanced_dataset(tiny, spec))
    headers = slice_headers(ds)
    assert [h.frame for h in headers] == list(range(TINY.slices))
    assert headers[3].position is not None
    assert headers[3].position[2] == pytest.approx(-350.0 + 3 * 5.0)
    assert headers[0].pixel_spacing == (5.6, 5.6) and headers[0].slice_thickness == 5.0
    assert headers[0].orientation == (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert np.array_equal(hu_volume([ds]).hu, _expected(tiny))


def test_slice_header_json_round_trip(tiny) -> None:
    header = slice_headers(phantom_datasets(tiny, TINY)[0])[0]
    assert header.frame is None and header.modality == "CT" and header.has_pixel_data
    assert header.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")
    restored = SliceHeader.from_dict(json.loads(json.dumps(header.to_dict())))
    assert restored == header


def test_slice_headers_tolerate_missing_attributes_and_never_decode() -> None:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    ds.add_new(0x00200032, "LO", "a\\b")  # ImagePositionPatient, malformed as written by a broken sender
    ds.PixelData = b"\x00\x01\x02"  # would not decode: must not be touched
    (header,) = slice_headers(ds)
    assert header.position is None and header.orientation is None and header.series_number is None
    assert header.rows == 0 and header.modality == "" and header.transfer_syntax_uid == ""
    assert header.has_pixel_data


# --- one typed error per defect ----------------------------------------------------------------


def _assert_admin_message(error: Exception, *fragments: str) -> None:
    text = str(error)
    assert text.startswith("series 2: "), text
    for fragment in fragments:
        assert fragment in text, text
    for word in PATIENT_WORDS:
        assert word not in text


def test_missing_slice_is_a_gap(tiny) -> None:
    datasets = phantom_datasets(tiny, TINY)
    del datasets[5]
    with pytest.raises(SliceGapError) as info:
        hu_volume(datasets)
    _assert_admin_message(info.value, "gap of 10.00 mm between slices 5 and 6", "expected 5.00 mm")


def test_duplicate_positions(tiny) -> None:
    datasets = phantom_datasets(tiny, TINY)
    datasets[4].ImagePositionPatient = list(datasets[3].ImagePositionPatient)
    with pytest.raises(DuplicatePositionError) as info:
        hu_volume(datasets)
    _assert_admin_message(info.value, "duplicate slice position")


def test_mixed_sizes(tiny) -> None:
    datasets = phantom_datasets(tiny, TINY)
    datasets[2].Rows, datasets[2].Columns = 32, 32
    datasets[2].PixelData = np.zeros((32, 32), np.int16).tobytes()
    with pytest.raises(MixedGeometryError) as info:
        hu_volume(datasets)
    _assert_admin_message(info.value, "64x64 and 32x32")


def test_mixed_pixel_spacing(tiny) -> None:
    datasets = phantom_datasets(tiny, TINY)
    datasets[7].PixelSpacing = [2.0, 2.0]
    with pytest.raises(MixedGeometryError, match="pixel spacing"):
        hu_volume(datasets)


def test_gantry_tilt(tiny) -> None:
    datasets = phantom_datasets(tiny, TINY)
    for k, ds in enumerate(datasets):  # 15 degrees: y shifts by tan(15) per mm of z
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + k * 5.0 * np.tan(np.radians(15)), z]
    with pytest.raises(GantryTiltError) as info:
        hu_volume(datasets)
    _assert_admin_message(info.value, "15.0 degrees")


def test_missing_pixel_data(tiny) -> None:
    datasets = phantom_datasets(tiny, TINY)
    del datasets[3].PixelData
    with pytest.raises(MissingPixelDataError) as info:
        hu_volume(datasets)
    _assert_admin_message(info.value, "1 of 12 instances have no pixel data")


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
def test_truncated_pixel_data(tiny, syntax: str) -> None:
    datasets = phantom_datasets(tiny, replace(TINY, transfer_syntax=syntax))
    datasets[6].PixelData = datasets[6].PixelData[: len(datasets[6].PixelData) // 2]
    with pytest.raises(PixelDecodeError) as info:
        hu_volume(datasets)
    _assert_admin_message(info.value, "cannot be decoded")


def test_fewer_than_two_slices(tiny) -> None:
    with pytest.raises(VolumeError, match="1 slice; a volume needs at least 2"):
        hu_volume(phantom_datasets(tiny, TINY)[:1])
    with pytest.raises(VolumeError, match="no instances"):
        hu_volume([])


def test_instances_of_two_series_are_refused(tiny) -> None:
    datasets = phantom_datasets(tiny, TINY)
    datasets[0].SeriesInstanceUID = "1.2.3"
    with pytest.raises(VolumeError, match="2 different series"):
        hu_volume(datasets)


def test_loading_allocates_the_output_once() -> None:
    spec = PhantomSpec(rows=512, columns=512, slices=24, slice_spacing=10.0)
    datasets = phantom_datasets(phantom_volume(spec), spec)
    tracemalloc.start()
    try:
        volume = hu_volume(datasets)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    mib = 2**20
    assert peak < volume.hu.nbytes * 1.15, f"peak {peak / mib:.0f} MiB for a {volume.hu.nbytes / mib:.0f} MiB volume"


# --- real data ---------------------------------------------------------------------------------


def test_real_siemens_jpeg2000_series_loads() -> None:
    folder = REAL / "totalsegmentator-example-ct"
    if not folder.is_dir():
        pytest.skip(f"real test data not present at {folder}")
    datasets = [pydicom.dcmread(f) for f in sorted(folder.iterdir())]
    volume = hu_volume(datasets)
    assert volume.hu.shape == (20, 512, 512)
    assert volume.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    assert volume.origin[2] == pytest.approx(-804.5)
    assert volume.hu.min() >= -1024 and volume.hu.max() < 3072
    body = volume.hu[10, 200:300, 200:300]
    assert -200 < float(np.median(body)) < 200, "abdominal soft tissue in the middle of the image"
