"""Training and evaluation data: CT series with optional masks and study-level labels.

Every series becomes a :class:`SeriesRecord` whose arrays load lazily, in the canonical
orientation of :mod:`models.volume` (axis 0 inferior->superior, 1 anterior->posterior, 2 patient
right->left), whatever the file stored: NIfTI is reoriented from its affine, DICOM through
``hu_volume``. Folder layout (see models/README.md)::

    DATA/labels.csv                         id,covid,cohort[,severity]
    DATA/images/<id>.nii.gz | <id>.nii | <id>/   (a folder: the DICOM files of one series)
    DATA/lungs/<id>.nii.gz | .nii | .npy    optional: lungs mask (binary, 1/2 labels, or LUNA16's
                                            3/4 lungs + 5 airway: the airway is dropped)
    DATA/lesions/<id>.nii.gz | .nii | .npy  optional: COVID-19 lesions mask (binary)

``.npy`` masks must already be in the canonical orientation of their image. Phantom records
(:func:`phantom_records`) give the same interface from :mod:`models.phantom_cohorts`, offline.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.phantom import PhantomSpec
from models.phantom_cohorts import COHORTS, COVID, OTHER, cohort_phantom

if TYPE_CHECKING:
    from nibabel.spatialimages import SpatialImage

IMAGE_DIR, LUNGS_DIR, LESIONS_DIR = "images", "lungs", "lesions"
NIFTI_SUFFIXES = (".nii.gz", ".nii")
MASK_SUFFIXES = (*NIFTI_SUFFIXES, ".npy")
#: NIfTI axis codes (direction each index grows towards) of the canonical orientation.
CANONICAL_AXCODES = ("S", "P", "L")
_TRUE, _FALSE = {"1", "true", "yes", "positive", "pos"}, {"0", "false", "no", "negative", "neg"}


class DatasetError(ValueError):
    """A dataset folder or labels file that does not follow the documented layout."""


@dataclass(frozen=True)
class SeriesData:
    """Arrays of one series in canonical orientation."""

    hu: np.ndarray  # float32 or int16 HU
    spacing: tuple[float, float, float]
    lungs: np.ndarray | None  # bool or uint8 labels (any nonzero is lung)
    lesions: np.ndarray | None  # bool


@dataclass(frozen=True)
class SeriesRecord:
    """One series, its study-level label and cohort, and where its masks are (loaded lazily)."""

    id: str
    covid: bool | None  # None: no study-level label
    cohort: str  # covid, normal, bacterial_pneumonia, nodules or other
    severity: float | None  # ground-truth max-lung severity (%) from labels.csv, if given
    has_lungs: bool
    has_lesions: bool
    loader: Callable[[], SeriesData]

    def load(self) -> SeriesData:
        data = self.loader()
        if not self.has_lesions and data.lesions is not None:
            data = replace(data, lesions=None)
        return data


# --- labels ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Label:
    covid: bool | None
    cohort: str
    severity: float | None


def read_labels(path: str | Path) -> dict[str, Label]:
    """labels.csv: ``id`` and ``covid`` (1/0, blank = unknown), optional ``cohort`` and ``severity``."""
    path = Path(path)
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "id" not in reader.fieldnames or "covid" not in reader.fieldnames:
            raise DatasetError(f"{path}: needs a header with at least the columns id,covid")
        out: dict[str, Label] = {}
        for line, row in enumerate(reader, start=2):
            ident = (row.get("id") or "").strip()
            if not ident:
                raise DatasetError(f"{path}:{line}: empty id")
            if ident in out:
                raise DatasetError(f"{path}:{line}: id {ident!r} appears twice")
            covid = _parse_bool(row.get("covid"), f"{path}:{line}")
            cohort = (row.get("cohort") or "").strip().lower().replace(" ", "_")
            if not cohort:
                cohort = COVID if covid else OTHER
            if cohort not in (*COHORTS, OTHER):
                raise DatasetError(f"{path}:{line}: cohort {cohort!r} is not one of {(*COHORTS, OTHER)}")
            sev = (row.get("severity") or "").strip()
            out[ident] = Label(covid=covid, cohort=cohort, severity=float(sev) if sev else None)
    return out


def _parse_bool(value: str | None, where: str) -> bool | None:
    text = (value or "").strip().lower()
    if not text:
        return None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise DatasetError(f"{where}: covid must be 1, 0 or blank, got {value!r}")


# --- files ------------------------------------------------------------------------------------


def _find(folder: Path, ident: str, suffixes: Sequence[str]) -> Path | None:
    for suffix in suffixes:
        candidate = folder / f"{ident}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _series_id(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_spatial_image(path: Path) -> SpatialImage:
    """The image file at ``path`` (NIfTI and the like: voxels with an affine); raises otherwise."""
    import nibabel as nib
    from nibabel.spatialimages import SpatialImage

    image = nib.load(str(path))
    if not isinstance(image, SpatialImage):
        raise DatasetError(f"{path}: not a volume with voxels and an affine ({type(image).__name__})")
    return image


def read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A NIfTI volume reoriented to canonical order, with its spacing (mm) along each axis."""
    from nibabel import orientations as ornt

    image = load_spatial_image(path)
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DatasetError(f"{path}: expected a 3D volume, got shape {data.shape}")
    source = ornt.io_orientation(image.affine)
    transform = ornt.ornt_transform(source, ornt.axcodes2ornt(CANONICAL_AXCODES))
    data = ornt.apply_orientation(data, transform)
    zooms = image.header.get_zooms()[:3]
    spacing = tuple(float(zooms[int(src)]) for src in _source_axis_of(transform))
    return np.ascontiguousarray(data), (spacing[0], spacing[1], spacing[2])


def _source_axis_of(transform: np.ndarray) -> list[int]:
    """For each output axis of ``apply_orientation(transform)``, the input axis it came from."""
    out = [0, 0, 0]
    for src, (dst, _flip) in enumerate(transform):
        out[int(dst)] = src
    return out


def read_dicom_series(folder: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    import pydicom

    from models.volume import hu_volume

    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DatasetError(f"{folder}: no files")
    volume = hu_volume([pydicom.dcmread(p) for p in files])
    return volume.hu, volume.spacing


def read_mask(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A mask file in canonical orientation, checked against the image shape."""
    mask: np.ndarray
    if path.name.endswith(".npy"):
        mask = np.load(path)
    else:
        mask, _ = read_nifti(path)
    if mask.shape != shape:
        raise DatasetError(f"{path}: mask shape {mask.shape} differs from the image's {shape}")
    labels: np.ndarray = np.rint(mask).astype(np.uint8)
    return labels


#: LUNA16 seg-lungs labels: 3 and 4 the lungs, 5 the trachea and main bronchi (not lung).
LUNA16_LUNGS, LUNA16_AIRWAY = (3, 4), 5


def lung_mask_labels(mask: np.ndarray, path: Path) -> np.ndarray:
    """A lungs mask as binary or 1/2 labels. LUNA16's labels (3, 4 lungs, 5 airway) become binary
    lungs without the airway; any other labelling is refused rather than guessed."""
    values = set(np.unique(mask).tolist()) - {0}
    if values <= {1, 2}:
        return mask
    if values <= {*LUNA16_LUNGS, LUNA16_AIRWAY}:
        return np.isin(mask, LUNA16_LUNGS).astype(np.uint8)
    raise DatasetError(f"{path}: lung mask labels {sorted(values)} are neither 1/2 nor LUNA16's 3/4 (+5 airway)")


def _file_loader(image: Path, lungs: Path | None, lesions: Path | None) -> Callable[[], SeriesData]:
    def load() -> SeriesData:
        if image.is_dir():
            hu, spacing = read_dicom_series(image)
        else:
            hu, spacing = read_nifti(image)
            hu = hu.astype(np.float32, copy=False)
        lung = lung_mask_labels(read_mask(lungs, hu.shape), lungs) if lungs is not None else None
        lesion = read_mask(lesions, hu.shape) > 0 if lesions is not None else None
        return SeriesData(hu=hu, spacing=spacing, lungs=lung, lesions=lesion)

    return load


def scan_dataset(root: str | Path, labels_path: str | Path | None = None) -> list[SeriesRecord]:
    """Records of every series under ``root/images``, joined with labels.csv (default ``root/labels.csv``).

    A labelled id without an image is an error (a typo would silently shrink a test set);
    an image without a label gets ``covid=None`` (usable for segmentation only).
    """
    root = Path(root)
    images = root / IMAGE_DIR
    if not images.is_dir():
        raise DatasetError(f"{root}: no {IMAGE_DIR}/ folder (see models/README.md for the layout)")
    labels_path = Path(labels_path) if labels_path is not None else root / "labels.csv"
    labels = read_labels(labels_path) if labels_path.is_file() else {}
    entries = {
        _series_id(p): p for p in sorted(images.iterdir())
        if p.is_dir() or p.name.endswith(NIFTI_SUFFIXES)
    }
    missing = sorted(set(labels) - set(entries))
    if missing:
        raise DatasetError(f"{labels_path}: {len(missing)} labelled ids have no image, e.g. {missing[:5]}")
    records = []
    for ident, image in entries.items():
        label = labels.get(ident, Label(covid=None, cohort=OTHER, severity=None))
        lungs = _find(root / LUNGS_DIR, ident, MASK_SUFFIXES)
        lesions = _find(root / LESIONS_DIR, ident, MASK_SUFFIXES)
        records.append(SeriesRecord(
            id=ident, covid=label.covid, cohort=label.cohort, severity=label.severity,
            has_lungs=lungs is not None, has_lesions=lesions is not None,
            loader=_file_loader(image, lungs, lesions),
        ))
    return records


# --- phantoms ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhantomGeometry:
    """Matrix and spacing of generated phantoms: by default a 358 mm field of view (the
    phantom's reference anatomy size) in a small matrix, ~180 pixels once resampled to 2 mm."""

    rows: int = 128
    pixel_spacing: float = 2.8
    slices: int = 40
    slice_spacing: float = 8.0
    #: Pixel spacing varies by up to this fraction between phantoms: the field of view, and so
    #: the drawn anatomy's size in pixels after resampling to 2 mm, varies with it.
    spacing_jitter: float = 0.15


#: Cohort of phantom i: half positives, the rest spread over the three negative cohorts.
PHANTOM_COHORT_CYCLE = (COVID, "normal", COVID, "nodules", COVID, "bacterial_pneumonia")


def phantom_records(
    count: int,
    *,
    seed: int = 0,
    geometry: PhantomGeometry = PhantomGeometry(),
    positive_mask_share: float = 1.0,
    negative_lesion_masks: bool = True,
    max_severity: float = 60.0,
) -> list[SeriesRecord]:
    """``count`` synthetic series with exact masks and labels (cohorts from PHANTOM_COHORT_CYCLE).

    ``positive_mask_share`` of the positives keep their lesion mask; the others are
    label-only, like the paper's Mosmed-1110 positives. Negatives keep an empty lesion mask
    only if ``negative_lesion_masks`` (evaluation: yes; multitask training: no, they train
    the classifier).
    """
    rng = np.random.default_rng(seed)
    records = []
    positives = 0
    for i in range(count):
        cohort = PHANTOM_COHORT_CYCLE[i % len(PHANTOM_COHORT_CYCLE)]
        sick = rng.uniform(1.0, max_severity)
        other = rng.uniform(0.0, max_severity) if rng.random() < 0.7 else 0.0
        left, right = (sick, other) if rng.random() < 0.5 else (other, sick)
        spec = PhantomSpec(
            slices=geometry.slices, rows=geometry.rows, columns=geometry.rows,
            pixel_spacing=geometry.pixel_spacing * (1.0 + rng.uniform(-1.0, 1.0) * geometry.spacing_jitter),
            slice_spacing=geometry.slice_spacing,
            severity_left=left if cohort == COVID else 0.0, severity_right=right if cohort == COVID else 0.0,
            seed=seed * 100_003 + i,
        )
        if cohort == COVID:  # spread the masked ones evenly over the positives
            keep_mask = math.floor((positives + 1) * positive_mask_share) > math.floor(positives * positive_mask_share)
            positives += 1
        else:
            keep_mask = negative_lesion_masks
        records.append(SeriesRecord(
            id=f"phantom-{seed}-{i:04d}", covid=cohort == COVID, cohort=cohort, severity=None,
            has_lungs=True, has_lesions=keep_mask,
            loader=_phantom_loader(cohort, spec, seed * 100_003 + i),
        ))
    return records


def _phantom_loader(cohort: str, spec: PhantomSpec, seed: int) -> Callable[[], SeriesData]:
    def load() -> SeriesData:
        phantom = cohort_phantom(cohort, spec, np.random.default_rng([seed, 7]))
        return SeriesData(hu=phantom.hu.astype(np.float32), spacing=phantom.spacing,
                          lungs=phantom.lungs, lesions=phantom.lesions > 0)

    return load


def describe(records: Sequence[SeriesRecord]) -> dict[str, Any]:
    """Counts per cohort and label availability, for checkpoint metadata and logs."""
    cohorts: dict[str, int] = {}
    for r in records:
        cohorts[r.cohort] = cohorts.get(r.cohort, 0) + 1
    return {
        "series": len(records),
        "cohorts": cohorts,
        "with_lung_masks": sum(r.has_lungs for r in records),
        "with_lesion_masks": sum(r.has_lesions for r in records),
        "with_labels": sum(r.covid is not None for r in records),
    }
