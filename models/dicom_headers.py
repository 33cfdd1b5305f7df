"""Per-frame DICOM header summaries and the geometry rules a CT stack must satisfy.

Series selection runs on stored headers (no pixel data, possibly long after the files were
read), and the volume loader runs on full datasets. Both need the same facts about each slice
and the same verdict on whether slices stack into a volume, so both live here: selection can
then never choose a series that the loader would reject for its geometry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from models.errors import (
    DuplicatePositionError,
    GantryTiltError,
    MixedGeometryError,
    SliceGapError,
    VolumeError,
)

#: Two slices closer than this along the normal are at "the same position". Positions are
#: written with at least 0.01 mm precision; real slice steps are >= 0.3 mm.
DUPLICATE_TOLERANCE_MM = 0.01
#: A step may differ from the median step by this fraction or by SPACING_ABS_TOLERANCE_MM,
#: whichever is larger. Vendors round positions (often to 0.1 mm, so a 0.625 mm step reads as
#: 0.6 or 0.7 mm), which this absorbs; one missing slice doubles a step (+100 %) and mixed
#: reconstructions (1.25 / 2.5 mm) differ by 50 % or more, which it rejects.
SPACING_REL_TOLERANCE = 0.10
SPACING_ABS_TOLERANCE_MM = 0.1
#: Positions may drift off the slice normal by this angle before the stack counts as tilted
#: (gantry tilt or a sheared stack). Real tilts are 5-30 degrees; rounding stays far below 1.
MAX_TILT_DEG = 1.0
#: Frames one instance may claim: a header is kept per frame, so NumberOfFrames is not taken on
#: trust (a 700-byte file claiming 10^8 frames would fill memory). Enhanced CT of a whole body at
#: 0.5 mm has about 4,000.
MAX_FRAMES = 10_000
#: Direction cosines and pixel spacings that differ by less than this are "the same".
ORIENTATION_TOLERANCE = 1e-3
PIXEL_SPACING_REL_TOLERANCE = 1e-3

_ENHANCED_GROUPS = ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence")


@dataclass(frozen=True)
class SliceHeader:
    """What we keep of one frame's header: enough to choose a series and to check its geometry."""

    sop_instance_uid: str
    frame: int | None  # 0-based frame index in a multi-frame instance; None for single-frame
    study_uid: str
    series_uid: str
    sop_class_uid: str
    modality: str
    series_number: int | None
    series_description: str
    image_type: tuple[str, ...]
    orientation: tuple[float, float, float, float, float, float] | None
    position: tuple[float, float, float] | None
    rows: int
    columns: int
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) in mm
    slice_thickness: float | None
    has_pixel_data: bool
    transfer_syntax_uid: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (tuples become lists) for storing beside the instance."""
        # Not dataclasses.asdict: its deep copy costs more than the rest of the C-STORE header work.
        out = {f.name: getattr(self, f.name) for f in _FIELDS}
        for key in ("image_type", "orientation", "position", "pixel_spacing"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SliceHeader:
        """Inverse of :meth:`to_dict`."""
        values = dict(data)
        for key in ("image_type", "orientation", "position", "pixel_spacing"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


_FIELDS = fields(SliceHeader)


def functional_group_item(ds: Dataset, frame: int, keyword: str) -> Dataset | None:
    """The first item of functional-group macro ``keyword`` for ``frame`` (per-frame wins over shared)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        seq = per_frame[frame].get(keyword)
        if seq:
            item: Dataset = seq[0]
            return item
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        seq = shared[0].get(keyword)
        if seq:
            shared_item: Dataset = seq[0]
            return shared_item
    return None


def declared_frames(ds: Dataset) -> int | None:
    """NumberOfFrames as the instance states it, read leniently (None: absent or unreadable)."""
    return _int_or_none(_attr(ds, "NumberOfFrames"))


def is_multiframe(ds: Dataset) -> bool:
    """True for instances whose frames are described by functional groups (Enhanced CT and kin)."""
    return any(k in ds for k in _ENHANCED_GROUPS) or declared_frames(ds) not in (None, 1)


def instance_uids(ds: Dataset) -> tuple[str, str, str]:
    """The study, series and SOP instance UIDs of ``ds``, as its headers state them ("" where
    absent or unreadable): the three keys that say where an instance is stored."""
    # Some anonymisers blank SOPInstanceUID but keep the file meta copy.
    sop_instance_uid = _str(_attr(ds, "SOPInstanceUID")) or _str(
        _attr(getattr(ds, "file_meta", None), "MediaStorageSOPInstanceUID"))
    return _str(_attr(ds, "StudyInstanceUID")), _str(_attr(ds, "SeriesInstanceUID")), sop_instance_uid


def slice_headers(ds: Dataset) -> list[SliceHeader]:
    """One header per frame of ``ds``; reads attributes only and never decodes pixel data."""
    file_meta = getattr(ds, "file_meta", None)
    study_uid, series_uid, sop_instance_uid = instance_uids(ds)
    common: dict[str, Any] = {
        "sop_instance_uid": sop_instance_uid,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "sop_class_uid": _str(_attr(ds, "SOPClassUID")),
        "modality": _str(_attr(ds, "Modality")).upper(),
        "series_number": _int_or_none(_attr(ds, "SeriesNumber")),
        "series_description": _str(_attr(ds, "SeriesDescription")),
        "image_type": _image_type(_attr(ds, "ImageType")),
        "rows": _int_or_none(_attr(ds, "Rows")) or 0,
        "columns": _int_or_none(_attr(ds, "Columns")) or 0,
        "has_pixel_data": any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")),
        "transfer_syntax_uid": _str(_attr(file_meta, "TransferSyntaxUID")),
    }
    # Where each frame's geometry lives: the top level for classic instances, the per-frame or
    # shared functional groups for multi-frame ones.
    sources: list[tuple[int | None, Dataset | None, Dataset | None, Dataset | None]]
    if is_multiframe(ds):
        n_frames = declared_frames(ds) or len(_attr(ds, "PerFrameFunctionalGroupsSequence") or [])
        sources = [
            (
                frame,
                functional_group_item(ds, frame, "PlanePositionSequence"),
                functional_group_item(ds, frame, "PlaneOrientationSequence"),
                functional_group_item(ds, frame, "PixelMeasuresSequence"),
            )
            for frame in range(n_frames or 1)
        ]
    else:
        sources = [(None, ds, ds, ds)]
    return [
        SliceHeader(
            frame=frame,
            orientation=_floats(_attr(plane_ori, "ImageOrientationPatient"), 6),
            position=_floats(_attr(plane_pos, "ImagePositionPatient"), 3),
            pixel_spacing=_floats(_attr(measures, "PixelSpacing"), 2),
            slice_thickness=_float_or_none(_attr(measures, "SliceThickness")),
            **common,
        )
        for frame, plane_pos, plane_ori, measures in sources
    ]


# --- stack geometry ------------------------------------------------------------------------


@dataclass(frozen=True)
class StackGeometry:
    """How a set of slices stacks: the order along the normal and the step between slices."""

    order: tuple[int, ...]  # indices into the given headers, sorted by position along the normal
    offsets_mm: tuple[float, ...]  # sorted positions along the normal
    slice_spacing_mm: float
    normal: tuple[float, float, float]  # unit row x column direction
    orientation: tuple[float, float, float, float, float, float]
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal (row direction x column direction) of an ImageOrientationPatient."""
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:6], dtype=float)
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        raise MixedGeometryError(f"degenerate ImageOrientationPatient {_fmt(orientation)}")
    return normal / norm


def stack_geometry(headers: Sequence[SliceHeader], *, label: str = "") -> StackGeometry:
    """Check that ``headers`` form one evenly spaced, untilted stack and return how it stacks.

    ``label`` (e.g. ``"series 3"``) prefixes error messages. Raises VolumeError (too few slices
    or missing geometry), MixedGeometryError, DuplicatePositionError, GantryTiltError or
    SliceGapError, each with a message an admin can act on.
    """
    prefix = f"{label}: " if label else ""
    n = len(headers)
    if n < 2:
        raise VolumeError(f"{prefix}{n} slice{'s' if n != 1 else ''}; a volume needs at least 2")
    for i, h in enumerate(headers):
        for name, value in (
            ("ImagePositionPatient", h.position),
            ("ImageOrientationPatient", h.orientation),
            ("PixelSpacing", h.pixel_spacing),
        ):
            if value is None:
                raise VolumeError(f"{prefix}slice {i + 1} of {n} has no {name}")
    first = headers[0]
    assert first.orientation is not None and first.pixel_spacing is not None
    for h in headers[1:]:
        if (h.rows, h.columns) != (first.rows, first.columns):
            raise MixedGeometryError(
                f"{prefix}slices differ in size ({first.rows}x{first.columns} and {h.rows}x{h.columns})"
            )
        for what, mine, ref, rtol, atol in (
            ("pixel spacing", h.pixel_spacing, first.pixel_spacing, PIXEL_SPACING_REL_TOLERANCE, 0.0),
            ("orientation", h.orientation, first.orientation, 0.0, ORIENTATION_TOLERANCE),
        ):
            if not np.allclose(mine or (), ref or (), rtol=rtol, atol=atol):
                raise MixedGeometryError(f"{prefix}slices differ in {what} ({_fmt(ref or ())} and {_fmt(mine or ())})")

    normal = slice_normal(first.orientation)
    positions = np.asarray([h.position for h in headers], dtype=float)
    offsets = positions @ normal
    order = np.argsort(offsets, kind="stable")
    offsets = offsets[order]
    steps = np.diff(offsets)

    dup = np.flatnonzero(steps < DUPLICATE_TOLERANCE_MM)
    if dup.size:
        k = int(dup[0])
        raise DuplicatePositionError(
            f"{prefix}{dup.size} duplicate slice position{'s' if dup.size > 1 else ''}; first: slices {k + 1} "
            f"and {k + 2} of {n} (sorted by position) both at {offsets[k]:.2f} mm along the slice normal"
        )

    # Tilt: positions must lie on one line along the normal. Compare each position's drift off
    # that line with its distance along it.
    rel = positions[order] - positions[order[0]]
    along = rel @ normal
    drift = np.linalg.norm(rel - np.outer(along, normal), axis=1)
    worst_drift = float(drift.max())
    tilt_deg = math.degrees(math.atan2(worst_drift, float(along[-1])))
    if worst_drift > 0.5 * min(first.pixel_spacing) and tilt_deg > MAX_TILT_DEG:
        raise GantryTiltError(
            f"{prefix}slice positions run {tilt_deg:.1f} degrees off the slice normal (gantry tilt or "
            f"sheared stack; drift up to {worst_drift:.1f} mm); tilted stacks are not supported"
        )

    expected = float(np.median(steps))
    tolerance = max(SPACING_ABS_TOLERANCE_MM, SPACING_REL_TOLERANCE * expected)
    bad = np.flatnonzero(np.abs(steps - expected) > tolerance)
    if bad.size:
        k = int(bad[np.argmax(np.abs(steps[bad] - expected))])
        kind = "gap" if steps[k] > expected else "step"
        missing = round(steps[k] / expected) - 1 if steps[k] > expected else 0
        hint = f" (about {missing} slice{'s' if missing != 1 else ''} missing)" if missing >= 1 else ""
        raise SliceGapError(
            f"{prefix}non-uniform slice spacing ({steps.min():.2f}-{steps.max():.2f} mm): {kind} of "
            f"{steps[k]:.2f} mm between slices {k + 1} and {k + 2} of {n} (sorted by position), "
            f"expected {expected:.2f} mm{hint}"
        )

    return StackGeometry(
        order=tuple(int(i) for i in order),
        offsets_mm=tuple(float(v) for v in offsets),
        slice_spacing_mm=expected,
        normal=(float(normal[0]), float(normal[1]), float(normal[2])),
        orientation=first.orientation,
        rows=first.rows,
        columns=first.columns,
        pixel_spacing=first.pixel_spacing,
    )


def series_label(series_number: int | None) -> str:
    """How messages name a series: by its number, which admins see in their viewers."""
    return f"series {series_number}" if series_number is not None else "series (no number)"


# --- tolerant attribute readers ----------------------------------------------------------------


def _attr(item: Dataset | None, keyword: str) -> Any:
    """``item.keyword`` or None: absent, or a value pydicom cannot convert (malformed files)."""
    if item is None:
        return None
    try:
        return item.get(keyword)
    except Exception:  # pydicom raises various types for values that do not parse
        return None


def _str(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _image_type(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip().upper() for v in value.split("\\") if v.strip())
    return tuple(str(v).strip().upper() for v in value)


def _float_or_none(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _floats(value: Any, count: int) -> Any:
    """A tuple of ``count`` finite floats, or None when absent or malformed."""
    if value is None or isinstance(value, str | bytes):
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(out) != count or not all(math.isfinite(v) for v in out):
        return None
    return out


def _fmt(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)
