"""DICOM edge of ``cttriage implant``: read a real series, implant ground glass on its canonical
grid (:mod:`models.implant`), write it back as a new series of the same study plus truth.json.

The delta is mapped back to each stored frame through the same :class:`models.volume.StackLayout`
that :func:`models.volume.hu_volume` reads with, so slice order, row/column flips and axis
order cannot disagree between what was implanted and what a reader sees.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from models.errors import SegmentationError, VolumeError
from models.implant import DEFAULT_HU_RANGE, SIDES, Implant, implant_ground_glass, source_grid_lung_labels
from models.volume import CtVolume, StackLayout, rescale, stack_layout

TRUTH_FILE = "truth.json"


@dataclass(frozen=True)
class ImplantedSeries:
    datasets: list[Dataset]
    implant: Implant
    volume: CtVolume  # the original
    source_series_uid: str


def read_series(folder: Path) -> list[Dataset]:
    """Every DICOM instance in ``folder`` (any depth, any name); one series only.

    Raises VolumeError (an input problem the user can act on) when there is none or several.
    """
    if not folder.is_dir():
        raise VolumeError(f"{folder} is not a folder of DICOM files")
    datasets: list[Dataset] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except (PydicomInvalidDicomError, OSError, EOFError, ValueError):
            continue
        if "PixelData" in ds or "SeriesInstanceUID" in ds:
            datasets.append(ds)
    if not datasets:
        raise VolumeError(f"no DICOM files in {folder}")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise VolumeError(f"{folder} holds {len(series)} series; give the folder of one")
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise VolumeError("multi-frame instances are not supported by the implant writer")
    return datasets


def implant_series(datasets: list[Dataset], *, lung: str, fraction: float, seed: int = 0,
                   hu_range: tuple[float, float] = DEFAULT_HU_RANGE,
                   description: str | None = None) -> ImplantedSeries:
    """Implanted copies of ``datasets``: same study, new series and instance UIDs, uncompressed."""
    volume, layout = stack_layout(datasets)
    labels = source_grid_lung_labels(volume.hu, volume.spacing)
    if not np.any(labels == SIDES[lung]):
        raise SegmentationError(f"no {lung} lung found by the threshold lung segmentation")
    implant = implant_ground_glass(volume.hu, volume.spacing, labels, lung=lung, fraction=fraction, seed=seed,
                                   hu_range=hu_range)
    suffix = description or f"implant GGO {round(100 * fraction)}% {lung}"
    source_uid = str(datasets[0].get("SeriesInstanceUID", ""))
    return ImplantedSeries(write_delta(layout, implant.delta, suffix), implant, volume, source_uid)


def write_delta(layout: StackLayout, delta: np.ndarray, description_suffix: str) -> list[Dataset]:
    """Copies of the layout's datasets with ``delta`` (HU, canonical grid) added to the stored
    pixels, re-encoded as Explicit VR Little Endian under a new series UID."""
    series_uid = generate_uid()
    per_rank = layout.source_view(delta)
    out = []
    for rank in range(per_rank.shape[0]):
        source, _ = layout.stored(rank)
        ds = copy.deepcopy(source)
        raw = pixel_array(source)
        slope, _ = rescale(source, None)
        stored = raw.astype(np.float64) + per_rank[rank].astype(np.float64) / slope
        _set_pixels(ds, np.rint(stored), raw.dtype)
        _new_identity(ds, series_uid, description_suffix)
        out.append(ds)
    return out


def _set_pixels(ds: Dataset, stored: np.ndarray, dtype: np.dtype) -> None:
    """Stored values back into PixelData, uncompressed, widening BitsStored only if they need it."""
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    bits = int(ds.get("BitsStored", 16))
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if stored.min() < low or stored.max() > high:
        bits = 16
        low, high = (-32768, 32767) if signed else (0, 65535)
        if stored.min() < low or stored.max() > high:
            raise VolumeError("implanted values do not fit in 16-bit pixels")
    pixels = stored.astype(np.int16 if signed else np.uint16)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    ds["PixelData"].is_undefined_length = False
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue", "LossyImageCompression"):
        if keyword in ds:
            del ds[keyword]


def _new_identity(ds: Dataset, series_uid: str, suffix: str) -> None:
    """Same study and patient; a new derived series whose description says what was done."""
    sop_uid = generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SeriesDescription = f"{ds.get('SeriesDescription', '') or ''} {suffix}".strip()[:64]
    image_type = list(ds.get("ImageType", []) or ["ORIGINAL", "PRIMARY", "AXIAL"])
    ds.ImageType = ["DERIVED", *image_type[1:]]
    ds.DerivationDescription = f"cttriage implant: {suffix} (synthetic ground glass added)"[:1024]


def write_implanted(result: ImplantedSeries, out: Path, source: Path) -> dict[str, Any]:
    """Write the instances as OUT/IM####.dcm and OUT/truth.json; returns the truth written."""
    out.mkdir(parents=True, exist_ok=True)
    for n, ds in enumerate(result.datasets, start=1):
        pydicom.dcmwrite(out / f"IM{n:04d}.dcm", ds, enforce_file_format=True)
    truth = {
        **result.implant.truth.to_dict(),
        "source": str(source),
        "source_series_uid": result.source_series_uid,
        "series_uid": str(result.datasets[0].SeriesInstanceUID),
        "study_uid": str(result.datasets[0].get("StudyInstanceUID", "")),
        "spacing_mm": list(result.volume.spacing),
        "lung_labels": "threshold lungs (models.threshold_method) on the 2 mm scoring grid, nearest neighbour back",
    }
    (out / TRUTH_FILE).write_text(json.dumps(truth, indent=2) + "\n")
    return truth
