"""Public CT data sets -> the training layout of :mod:`models.datasets` (``cttriage data``).

Each converter reads one public layout and writes ``OUT/images``, ``OUT/lungs``, ``OUT/lesions``
and ``OUT/labels.csv``, and returns a :class:`ConversionSummary` of what it took, what it
skipped and why, so a wrong folder or a broken file shows up here rather than hours into
training. Images are hard-linked where the file system allows (else copied) when they are
already NIfTI; masks are rewritten where their labels must change:

* **MosMedData** (Mosmed-1110): ``studies/CT-0..CT-4/study_XXXX.nii.gz``, ``masks/study_XXXX_mask.nii.gz``.
  CT-0 -> covid 0, CT-1..CT-4 -> covid 1 (the class goes to ``ct_class``; its severity is a range,
  so ``severity`` stays blank); the 50 masks -> ``lesions/``.
* **MedSeg** (MedSeg-29): ``rp_im/N.nii.gz`` with ``rp_msk`` (1 ground glass, 2 consolidation, 3
  pleural effusion: lesions are 1 and 2) and ``rp_lung_msk``; and Jun et al.'s
  ``COVID-19-CT-Seg_20cases/*.nii.gz`` with ``Infection_Mask`` and ``Lung_Mask``. All covid 1. Volumes
  whose intensities lie in 0..255 (JPEG-converted, not HU) are skipped, named.
* **LUNA16**: ``subset*/<uid>.mhd`` with ``seg-lungs-LUNA16/<uid>.mhd``; MetaImage is converted to
  NIfTI. The lung masks' labels 3 and 4 are the lungs, 5 the trachea and main bronchi: the
  airway is dropped, not folded into the lungs. ``covid`` blank (lungs training only).

Lung masks are written binary: :func:`models.evaluation.true_lung_labels` splits them into the
patient's right and left lung geometrically, whatever side convention a data set used.
Header checks (shape, readable header) are cheap; ``verify=True`` also decompresses every image,
which finds truncated files before training does (training skips and names them anyway).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.datasets import CANONICAL_AXCODES, IMAGE_DIR, LESIONS_DIR, LUNGS_DIR, load_spatial_image
from models.phantom_cohorts import COVID, OTHER

MOSMED_CLASSES = ("CT-0", "CT-1", "CT-2", "CT-3", "CT-4")
#: rp_msk labels that are COVID-19 lesions (3, pleural effusion, is not).
MEDSEG_LESION_LABELS = (1, 2)
#: LUNA16 seg-lungs labels: 3 and 4 the two lungs, 5 the trachea and main stem bronchi.
LUNA16_LUNG_LABELS, LUNA16_AIRWAY_LABEL = (3, 4), 5
LABEL_COLUMNS = ("id", "covid", "cohort", "severity", "source", "ct_class")


class ConversionError(ValueError):
    """The source folder is not the layout the converter reads, or the output would overwrite data."""


@dataclass
class ConversionSummary:
    """What a conversion took and skipped, and why; ``lines()`` is what ``cttriage data`` prints."""

    dataset: str
    out: Path
    taken: dict[str, int] = field(default_factory=dict)  # per class / kind
    lung_masks: int = 0
    lesion_masks: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    @property
    def series(self) -> int:
        return sum(self.taken.values())

    def take(self, kind: str) -> None:
        self.taken[kind] = self.taken.get(kind, 0) + 1

    def skip(self, path: Path | str, reason: str) -> None:
        self.skipped.append((str(path), reason))

    def lines(self) -> list[str]:
        out = [f"{self.dataset}: {self.series} series written to {self.out}",
               "  taken: " + (", ".join(f"{k} {v}" for k, v in sorted(self.taken.items())) or "nothing"),
               f"  masks: {self.lesion_masks} lesion, {self.lung_masks} lung",
               f"  skipped: {len(self.skipped)}"]
        out += [f"    {path}: {reason}" for path, reason in self.skipped]
        return out


@dataclass(frozen=True)
class _Row:
    id: str
    covid: str  # "1", "0" or ""
    cohort: str
    source: str
    ct_class: str = ""


# --- shared ------------------------------------------------------------------------------------


def _prepare_out(out: Path) -> None:
    if (out / "labels.csv").exists():
        raise ConversionError(f"{out}/labels.csv exists: convert into a new folder")
    for name in (IMAGE_DIR, LUNGS_DIR, LESIONS_DIR):
        (out / name).mkdir(parents=True, exist_ok=True)


def _write_labels(out: Path, rows: list[_Row]) -> None:
    with (out / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(LABEL_COLUMNS)
        for r in rows:
            writer.writerow([r.id, r.covid, r.cohort, "", r.source, r.ct_class])


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: a copy does the same
        shutil.copy2(src, dst)


def _nifti_stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith((".nii.gz", ".nii")))


def _header_shape(path: Path, verify: bool) -> tuple[int, ...]:
    """The 3D shape from the header (reading every voxel if ``verify``); raises on an unreadable file."""
    image = load_spatial_image(path)
    shape = tuple(int(n) for n in image.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ConversionError(f"not a 3D volume (shape {shape})")
    if verify:
        np.asanyarray(image.dataobj)
    return shape


def _write_mask_like(reference: Path, mask: np.ndarray, dst: Path) -> None:
    """``mask`` (in the reference file's voxel order) as uint8 NIfTI with the reference's geometry."""
    import nibabel as nib

    ref = load_spatial_image(reference)
    image = nib.Nifti1Image(mask.astype(np.uint8), ref.affine)
    image.set_qform(ref.affine, code=1)
    image.set_sform(ref.affine, code=1)
    nib.save(image, str(dst))


def _read_voxels(path: Path) -> np.ndarray:
    data: np.ndarray = np.asanyarray(load_spatial_image(path).dataobj)
    return data[..., 0] if data.ndim == 4 else data


def _reason(exc: Exception) -> str:
    return f"unreadable ({type(exc).__name__}: {exc})"


# --- MosMedData -----------------------------------------------------------------------------------


_MOSMED_MASK = re.compile(r"^(study_\d+)_mask$")


def convert_mosmed(src: Path, out: Path, *, verify: bool = False, ct0_cohort: str = OTHER) -> ConversionSummary:
    """MosMedData (studies/CT-k/, masks/) -> training layout; see the module docstring.

    ``ct0_cohort``: CT-0 means no signs of viral pneumonia, not necessarily a normal chest, so
    ``other`` by default; ``normal`` puts CT-0 into the ROC AUC vs. normal column."""
    if ct0_cohort not in ("other", "normal"):
        raise ConversionError(f"ct0_cohort must be 'other' or 'normal', got {ct0_cohort!r}")
    studies = src / "studies"
    if not studies.is_dir() or not any((studies / c).is_dir() for c in MOSMED_CLASSES):
        raise ConversionError(f"{src}: expected studies/CT-0 .. studies/CT-4 (MosMedData's layout)")
    _prepare_out(out)
    summary = ConversionSummary("MosMedData", out)
    rows: list[_Row] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for ct_class in MOSMED_CLASSES:
        folder = studies / ct_class
        if not folder.is_dir():
            continue
        for path in _nifti_files(folder):
            ident = _nifti_stem(path)
            if ident in shapes:
                summary.skip(path, f"{ident} appears in two class folders")
                continue
            try:
                shapes[ident] = _header_shape(path, verify)
            except Exception as exc:  # a broken download is one skipped study, named
                summary.skip(path, _reason(exc))
                continue
            _link_or_copy(path, out / IMAGE_DIR / path.name)
            covid = ct_class != "CT-0"
            rows.append(_Row(ident, "1" if covid else "0", COVID if covid else ct0_cohort, "mosmed", ct_class))
            summary.take(ct_class)
    masks = src / "masks"
    for path in _nifti_files(masks) if masks.is_dir() else []:
        match = _MOSMED_MASK.match(_nifti_stem(path))
        if match is None:
            summary.skip(path, "not named study_XXXX_mask")
            continue
        ident = match.group(1)
        if ident not in shapes:
            summary.skip(path, f"no readable study {ident} in studies/")
            continue
        try:
            shape = _header_shape(path, verify)
        except Exception as exc:
            summary.skip(path, _reason(exc))
            continue
        if shape != shapes[ident]:
            summary.skip(path, f"mask shape {shape} differs from the study's {shapes[ident]}: study kept label-only")
            continue
        _link_or_copy(path, out / LESIONS_DIR / path.name.replace(_nifti_stem(path), ident))
        summary.lesion_masks += 1
    _write_labels(out, rows)
    return summary


# --- MedSeg ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MedSegPart:
    images: str
    lesions: str
    lungs: str
    prefix: str
    lesion_labels: tuple[int, ...] | None  # None: any nonzero


_MEDSEG_PARTS = (
    _MedSegPart("rp_im", "rp_msk", "rp_lung_msk", "medseg_rp_", MEDSEG_LESION_LABELS),
    _MedSegPart("COVID-19-CT-Seg_20cases", "Infection_Mask", "Lung_Mask", "", None),
)


def convert_medseg(src: Path, out: Path, *, verify: bool = False) -> ConversionSummary:
    """MedSeg-29 (the 9 rp_* volumes and Jun et al.'s 20 cases) -> training layout, all covid 1."""
    parts = [p for p in _MEDSEG_PARTS if (src / p.images).is_dir()]
    if not parts:
        raise ConversionError(f"{src}: expected rp_im/ (with rp_msk/, rp_lung_msk/) or COVID-19-CT-Seg_20cases/ "
                              "(with Infection_Mask/, Lung_Mask/)")
    _prepare_out(out)
    summary = ConversionSummary("MedSeg", out)
    rows: list[_Row] = []
    for part in parts:
        for path in _nifti_files(src / part.images):
            stem = _nifti_stem(path)
            ident = f"{part.prefix}{stem}"
            try:
                hu = _read_voxels(path)
            except Exception as exc:
                summary.skip(path, _reason(exc))
                continue
            if hu.ndim != 3:
                summary.skip(path, f"not a 3D volume (shape {hu.shape})")
                continue
            if float(hu.min()) >= 0.0 and float(hu.max()) <= 255.0:
                summary.skip(path, "intensities lie in 0..255 (a JPEG-converted image, not HU)")
                continue
            lesion = _mask_path(src / part.lesions, stem)
            if lesion is None:
                summary.skip(path, f"no lesion mask in {part.lesions}/")
                continue
            try:
                voxels = _read_voxels(lesion)
                if voxels.shape != hu.shape:
                    raise ConversionError(f"lesion mask shape {voxels.shape} differs from the image's {hu.shape}")
                lesions = np.isin(voxels, part.lesion_labels) if part.lesion_labels else voxels > 0
                lung = _mask_path(src / part.lungs, stem)
                lungs = _read_voxels(lung) > 0 if lung is not None else None
                if lungs is not None and lungs.shape != hu.shape:
                    raise ConversionError(f"lung mask shape {lungs.shape} differs from the image's {hu.shape}")
            except Exception as exc:
                summary.skip(path, f"masks: {exc}")
                continue
            _link_or_copy(path, out / IMAGE_DIR / f"{ident}{path.name[len(stem):]}")
            _write_mask_like(path, lesions, out / LESIONS_DIR / f"{ident}.nii.gz")
            summary.lesion_masks += 1
            if lungs is not None:
                _write_mask_like(path, lungs, out / LUNGS_DIR / f"{ident}.nii.gz")
                summary.lung_masks += 1
            rows.append(_Row(ident, "1", COVID, "medseg"))
            summary.take(part.images)
    _write_labels(out, rows)
    return summary


def _mask_path(folder: Path, stem: str) -> Path | None:
    """The mask of image ``stem`` in ``folder``: same name, or the name with _mask/_seg/lung/infection."""
    if not folder.is_dir():
        return None
    for path in _nifti_files(folder):
        name = _nifti_stem(path)
        if name == stem or name.replace("_mask", "").replace("_seg", "") == stem:
            return path
    return None


# --- LUNA16 ---------------------------------------------------------------------------------------


_MET_TYPES = {"MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_USHORT": "u2", "MET_SHORT": "i2", "MET_UINT": "u4",
              "MET_INT": "i4", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}


def read_metaimage(path: Path) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, float, float]]:
    """A 3D MetaImage (.mhd + raw/zraw data) in canonical order (S, P, L), with spacing and LPS origin.

    Only axis-aligned direction matrices are read (LUNA16's are the identity): anything else
    raises, it would need resampling.
    """
    header: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            header[key.strip()] = value.strip()
    if int(header.get("NDims", "0")) != 3:
        raise ConversionError(f"{path}: not a 3D MetaImage")
    dims = [int(v) for v in header["DimSize"].split()]  # x, y, z
    spacing = [float(v) for v in header.get("ElementSpacing", "1 1 1").split()]
    origin = [float(v) for v in header.get("Offset", header.get("Origin", "0 0 0")).split()]
    matrix = np.array([float(v) for v in header.get("TransformMatrix", "1 0 0 0 1 0 0 0 1").split()]).reshape(3, 3)
    if not np.allclose(np.abs(matrix), np.eye(3)):
        raise ConversionError(f"{path}: direction {matrix.tolist()} is not axis-aligned")
    kind = _MET_TYPES.get(header.get("ElementType", ""))
    if kind is None:
        raise ConversionError(f"{path}: element type {header.get('ElementType')!r} not read")
    order = ">" if header.get("BinaryDataByteOrderMSB", header.get("ElementByteOrderMSB", "False")) == "True" else "<"
    data_file = path.parent / header["ElementDataFile"]
    raw = data_file.read_bytes()
    if header.get("CompressedData", "False") == "True":
        raw = zlib.decompress(raw)
    expected = int(np.prod(dims)) * np.dtype(kind).itemsize
    if len(raw) != expected:
        raise ConversionError(f"{data_file}: {len(raw)} bytes, expected {expected} for {dims} {kind}")
    volume = np.frombuffer(raw, dtype=np.dtype(order + kind)).reshape(dims[2], dims[1], dims[0])
    # Stored axes are (z, y, x) of LPS: with a +1 diagonal that is already (S, P, L); -1 flips that axis.
    for axis, sign in ((0, matrix[2, 2]), (1, matrix[1, 1]), (2, matrix[0, 0])):
        if sign < 0:
            volume = np.flip(volume, axis=axis)
    return (np.ascontiguousarray(volume), (spacing[2], spacing[1], spacing[0]),
            (origin[0], origin[1], origin[2]))


def write_canonical_nifti(volume: np.ndarray, spacing: tuple[float, float, float], dst: Path,
                          origin_lps: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
    """A canonical (S, P, L) array as NIfTI whose affine says so (``read_nifti`` gives it back as is)."""
    import nibabel as nib
    from nibabel import orientations as ornt

    assert CANONICAL_AXCODES == ("S", "P", "L")
    affine = np.zeros((4, 4))
    affine[2, 0] = spacing[0]  # axis 0 -> superior (+z in RAS)
    affine[1, 1] = -spacing[1]  # axis 1 -> posterior (-y in RAS)
    affine[0, 2] = -spacing[2]  # axis 2 -> patient left (-x in RAS)
    affine[:3, 3] = (-origin_lps[0], -origin_lps[1], origin_lps[2])
    affine[3, 3] = 1.0
    assert ornt.aff2axcodes(affine) == CANONICAL_AXCODES
    image = nib.Nifti1Image(volume, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(dst))


def luna16_lungs(mask: np.ndarray) -> np.ndarray:
    """Binary lungs from a LUNA16 seg-lungs mask: labels 3 and 4; the airway (5) is left out."""
    return np.isin(mask, LUNA16_LUNG_LABELS).astype(np.uint8)


def convert_luna16(src: Path, out: Path, *, verify: bool = False) -> ConversionSummary:
    """LUNA16 (subset*/*.mhd, seg-lungs-LUNA16/*.mhd) -> NIfTI images and binary lung masks, covid blank."""
    del verify  # every image is read in full anyway (MetaImage -> NIfTI)
    images = sorted(p for d in sorted(src.glob("subset*")) if d.is_dir() for p in d.glob("*.mhd"))
    masks_dir = src / "seg-lungs-LUNA16"
    if not images:
        raise ConversionError(f"{src}: expected subset*/<uid>.mhd (LUNA16's layout)")
    _prepare_out(out)
    summary = ConversionSummary("LUNA16", out)
    rows: list[_Row] = []
    for path in images:
        ident = path.stem
        try:
            hu, spacing, origin = read_metaimage(path)
            mask_path = masks_dir / f"{ident}.mhd"
            lungs = None
            if mask_path.is_file():
                mask, _, _ = read_metaimage(mask_path)
                if mask.shape != hu.shape:
                    raise ConversionError(f"lung mask shape {mask.shape} differs from the image's {hu.shape}")
                lungs = luna16_lungs(mask)
        except Exception as exc:
            summary.skip(path, _reason(exc))
            continue
        write_canonical_nifti(hu, spacing, out / IMAGE_DIR / f"{ident}.nii.gz", origin)
        if lungs is not None:
            write_canonical_nifti(lungs, spacing, out / LUNGS_DIR / f"{ident}.nii.gz", origin)
            summary.lung_masks += 1
        else:
            summary.skip(mask_path, "no lung mask: the image is kept without one")
        rows.append(_Row(ident, "", OTHER, "luna16"))
        summary.take(path.parent.name)
    _write_labels(out, rows)
    return summary


CONVERTERS: dict[str, Callable[..., ConversionSummary]] = {
    "mosmed": convert_mosmed,
    "medseg": convert_medseg,
    "luna16": convert_luna16,
}
