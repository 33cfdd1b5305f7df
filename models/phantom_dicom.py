"""The chest phantom (``models.phantom``) written as real DICOM series: CT Image Storage slices,
a thick-slab reconstruction, a localizer, an Enhanced CT instance, and ``write_phantom`` for a
folder with ``truth.json``.

Slices are written head-first supine in LPS; ``PhantomSpec.flip_lr`` only changes the row
direction the pixels are stored in, so the loader's canonical arrays equal ``PhantomVolume``'s.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    generate_uid,
)

from models.phantom import COMPRESSED_SYNTAXES, PhantomSpec, PhantomVolume, phantom_grid, phantom_volume

RESCALE_INTERCEPT = -1024
PIXEL_PADDING_VALUE = -2000  # stored value outside the reconstruction circle (GE style)


@dataclass(frozen=True)
class PhantomStudy:
    """The patient and study that instances belong to; every series of one study shares it."""

    study_uid: str = field(default_factory=generate_uid)
    accession: str = "PH0001"
    patient_id: str = "PH0001"
    patient_name: str = "PHANTOM^CHEST"

    @property
    def frame_of_reference_uid(self) -> str:
        return generate_uid(entropy_srcs=[self.study_uid, "frame-of-reference"])


def _base_dataset(
    study: PhantomStudy,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    description: str,
    image_type: str,
    sop_class_uid: str = CTImageStorage,
) -> Dataset:
    """Patient, study, series and equipment modules shared by every phantom instance."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "CTTRIAGE_PHANTOM"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = image_type.split("\\")
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20240115"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "101500"
    ds.AccessionNumber = study.accession
    ds.Modality = "CT"
    ds.Manufacturer = "cttriage-phantom"
    ds.ManufacturerModelName = "chest phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = description
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.KVP = 120
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = -600
    ds.WindowWidth = 1500
    return ds


def _set_pixels(ds: Dataset, stored: np.ndarray, transfer_syntax: str) -> None:
    """Attach int16 stored values in ``transfer_syntax`` (compressing where it is compressed)."""
    ds.Rows, ds.Columns = (int(v) for v in stored.shape[-2:])
    if transfer_syntax in COMPRESSED_SYNTAXES:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        try:
            ds.compress(transfer_syntax, np.ascontiguousarray(stored), generate_instance_uid=False)
        except (RuntimeError, ValueError, ImportError) as exc:
            raise ValueError(
                f"cannot encode {pydicom.uid.UID(transfer_syntax).name} here ({exc}); "
                "install an encoder plugin (pylibjpeg-openjpeg for JPEG 2000) or use another syntax"
            ) from exc
        return
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    dtype = ">i2" if transfer_syntax == ExplicitVRBigEndian else "<i2"
    ds.PixelData = np.ascontiguousarray(stored, dtype=dtype).tobytes()
    ds["PixelData"].VR = "OW"


def _stored(hu_slice: np.ndarray, outside_fov: np.ndarray, flip_lr: bool) -> np.ndarray:
    stored = hu_slice.astype(np.int16) - np.int16(RESCALE_INTERCEPT)
    stored[outside_fov] = PIXEL_PADDING_VALUE
    return stored[:, ::-1] if flip_lr else stored


def _axial_series(
    hu: np.ndarray,
    z_positions: Sequence[float] | np.ndarray,
    thickness: float,
    spec: PhantomSpec,
    study: PhantomStudy,
    series_uid: str,
    series_number: int,
    description: str,
) -> list[Dataset]:
    grid = phantom_grid(spec)
    outside_fov = grid.x[None, :] ** 2 + grid.y[:, None] ** 2 > grid.fov_radius**2
    x_first = float(grid.x[-1] if spec.flip_lr else grid.x[0])
    row_dir = (-1.0, 0.0, 0.0) if spec.flip_lr else (1.0, 0.0, 0.0)
    out = []
    for k, z in enumerate(z_positions):
        sop_uid = generate_uid(entropy_srcs=[series_uid, str(k)])
        ds = _base_dataset(study, series_uid, sop_uid, series_number, description, "ORIGINAL\\PRIMARY\\AXIAL")
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(x_first, 4), round(float(grid.y[0]), 4), round(float(z), 4)]
        ds.ImageOrientationPatient = [*row_dir, 0.0, 1.0, 0.0]
        ds.SliceLocation = round(float(z), 4)
        ds.PixelSpacing = [spec.pixel_spacing, spec.pixel_spacing]
        ds.SliceThickness = thickness
        ds.PixelPaddingValue = PIXEL_PADDING_VALUE
        ds.ConvolutionKernel = "STANDARD"
        _set_pixels(ds, _stored(hu[k], outside_fov, spec.flip_lr), spec.transfer_syntax)
        out.append(ds)
    return out


def _check_matches(phantom: PhantomVolume, spec: PhantomSpec) -> None:
    if phantom.hu.shape != (spec.slices, spec.rows, spec.columns):
        raise ValueError(f"spec describes {spec.slices}x{spec.rows}x{spec.columns}, phantom is {phantom.hu.shape}")


def phantom_datasets(
    phantom: PhantomVolume,
    spec: PhantomSpec,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 2,
    accession: str = "PH0001",
    patient_id: str = "PH0001",
    patient_name: str = "PHANTOM^CHEST",
) -> list[pydicom.Dataset]:
    """One CT Image Storage instance per slice, encoded in ``spec.transfer_syntax``.

    ``spec`` must describe the phantom's geometry; only how it is written (transfer syntax,
    ``flip_lr``) may differ from the spec that generated it. Missing UIDs are generated.
    """
    _check_matches(phantom, spec)
    study = PhantomStudy(study_uid or generate_uid(), accession, patient_id, patient_name)
    grid = phantom_grid(spec)
    return _axial_series(
        phantom.hu, grid.z, spec.slice_spacing, spec, study, series_uid or generate_uid(), series_number,
        f"CHEST {spec.slice_spacing:g}mm",
    )


def thick_datasets(
    phantom: PhantomVolume,
    spec: PhantomSpec,
    thickness_mm: float = 5.0,
    *,
    study: PhantomStudy,
    series_uid: str | None = None,
    series_number: int = 3,
) -> list[pydicom.Dataset]:
    """A thick-slab reconstruction as another series of the study.

    Slabs of ``thickness_mm`` tile the covered range from its inferior edge; each is the mean of
    the thin slices whose centres fall inside it (like a scanner's thick reconstruction).
    """
    _check_matches(phantom, spec)
    grid = phantom_grid(spec)
    bottom = float(grid.z[0]) - spec.slice_spacing / 2
    n = int((spec.slices * spec.slice_spacing + 1e-6) // thickness_mm)
    if thickness_mm < spec.slice_spacing or n < 1:
        raise ValueError(f"thick slices of {thickness_mm} mm need thinner slices and at least one slab of coverage")
    slab_of = np.floor((grid.z - bottom) / thickness_mm).astype(int)
    slabs = np.empty((n, spec.rows, spec.columns), dtype=np.int16)
    for i in range(n):
        slabs[i] = np.rint(phantom.hu[slab_of == i].mean(axis=0))
    z = bottom + (np.arange(n) + 0.5) * thickness_mm
    return _axial_series(
        slabs, z, float(thickness_mm), spec, study, series_uid or generate_uid(), series_number,
        f"CHEST {thickness_mm:g}mm"
    )


def scout_dataset(
    phantom: PhantomVolume,
    spec: PhantomSpec,
    *,
    study: PhantomStudy,
    series_uid: str | None = None,
    series_number: int = 1,
) -> pydicom.Dataset:
    """A frontal localizer (ImageType ...\\LOCALIZER): mean HU along anterior-posterior."""
    _check_matches(phantom, spec)
    series_uid = series_uid or generate_uid()
    grid = phantom_grid(spec)
    projection = phantom.hu.mean(axis=1)[::-1]  # rows run superior -> inferior
    ds = _base_dataset(
        study, series_uid, generate_uid(entropy_srcs=[series_uid, "scout"]), series_number, "TOPOGRAM",
        "ORIGINAL\\PRIMARY\\LOCALIZER",
    )
    ds.InstanceNumber = 1
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    ds.ImagePositionPatient = [round(float(grid.x[0]), 4), 0.0, round(float(grid.z[-1]), 4)]
    ds.PixelSpacing = [spec.slice_spacing, spec.pixel_spacing]
    stored = np.rint(projection).astype(np.int16) - np.int16(RESCALE_INTERCEPT)
    _set_pixels(ds, stored, ExplicitVRLittleEndian)
    return ds


def enhanced_dataset(
    phantom: PhantomVolume,
    spec: PhantomSpec,
    *,
    study: PhantomStudy | None = None,
    series_uid: str | None = None,
    series_number: int = 2,
) -> pydicom.Dataset:
    """The same series as one Enhanced CT Image Storage instance (multi-frame, functional groups)."""
    _check_matches(phantom, spec)
    study = study or PhantomStudy()
    series_uid = series_uid or generate_uid()
    grid = phantom_grid(spec)
    ds = _base_dataset(
        study, series_uid, generate_uid(entropy_srcs=[series_uid, "enhanced"]), series_number,
        f"CHEST {spec.slice_spacing:g}mm ENHANCED", "ORIGINAL\\PRIMARY\\AXIAL\\NONE", EnhancedCTImageStorage,
    )
    for keyword in ("RescaleIntercept", "RescaleSlope", "RescaleType", "WindowCenter", "WindowWidth"):
        delattr(ds, keyword)  # Enhanced CT carries these in functional groups
    ds.InstanceNumber = 1
    ds.NumberOfFrames = spec.slices
    ds.ContentQualification = "PRODUCT"
    ds.PixelPaddingValue = PIXEL_PADDING_VALUE
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [spec.pixel_spacing, spec.pixel_spacing]
    measures.SliceThickness = spec.slice_spacing
    orientation = Dataset()
    orientation.ImageOrientationPatient = [-1.0 if spec.flip_lr else 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    transform = Dataset()
    transform.RescaleIntercept = RESCALE_INTERCEPT
    transform.RescaleSlope = 1
    transform.RescaleType = "HU"
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    x_first = float(grid.x[-1] if spec.flip_lr else grid.x[0])
    frames = []
    for k, z in enumerate(grid.z):
        item, position, content = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [round(x_first, 4), round(float(grid.y[0]), 4), round(float(z), 4)]
        content.InStackPositionNumber = k + 1
        item.PlanePositionSequence = DicomSequence([position])
        item.FrameContentSequence = DicomSequence([content])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    outside_fov = grid.x[None, :] ** 2 + grid.y[:, None] ** 2 > grid.fov_radius**2
    stored = np.stack([_stored(phantom.hu[k], outside_fov, spec.flip_lr) for k in range(spec.slices)])
    _set_pixels(ds, stored, spec.transfer_syntax)
    return ds


def write_phantom(out_dir: str | Path, spec: PhantomSpec = PhantomSpec(), **uid_kwargs: Any) -> dict[str, Any]:
    """Write the phantom as ``IM0001.dcm``... (all series of the study) and ``truth.json``.

    ``uid_kwargs`` are :func:`phantom_datasets`'s (study_uid, series_uid, series_number,
    accession, patient_id, patient_name); a thick series and a scout, when the spec asks for
    them, join the same study. Returns the truth: volumes and severities of the main series,
    its UIDs, the file count, and a ``series`` list describing every series written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    phantom = phantom_volume(spec)
    main = phantom_datasets(phantom, spec, **uid_kwargs)
    first = main[0]
    study = PhantomStudy(first.StudyInstanceUID, first.AccessionNumber, first.PatientID, str(first.PatientName))
    series: list[tuple[str, list[Dataset]]] = [("axial", main)]
    if spec.thick_series_mm:
        number = int(first.SeriesNumber) + 1
        series.append(("thick", thick_datasets(phantom, spec, spec.thick_series_mm, study=study, series_number=number)))
    if spec.scout:
        series.append(("localizer", [scout_dataset(phantom, spec, study=study, series_number=1)]))
    n = 0
    described = []
    for kind, datasets in series:
        for ds in datasets:
            n += 1
            pydicom.dcmwrite(out / f"IM{n:04d}.dcm", ds, enforce_file_format=True)
        described.append(
            {
                "kind": kind,
                "series_instance_uid": datasets[0].SeriesInstanceUID,
                "series_number": int(datasets[0].SeriesNumber),
                "files": len(datasets),
            }
        )
    truth = dict(phantom.truth)
    truth.update(
        study_instance_uid=study.study_uid,
        series_instance_uid=first.SeriesInstanceUID,
        files=n,
        series=described,
        spec=asdict(spec),
    )
    (out / "truth.json").write_text(json.dumps(truth, indent=2, sort_keys=True))
    return truth
