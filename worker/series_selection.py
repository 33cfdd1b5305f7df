"""Choose the one series of a study that gets scored, and say why every other one was not.

A CT study typically holds a localizer, thin and thick axial reconstructions, reformats and
sometimes dose reports. Scoring wants the thinnest complete axial CT stack; admins want to know
why a study was skipped, so each passed-over series gets a plain reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from app.errors import NoUsableSeriesError, VolumeError
from models.dicom_headers import SliceHeader, series_label, slice_normal, stack_geometry

#: A series is axial when its slice normal is within this angle of the patient's head-foot axis.
#: Gantry-tilted axial scans are within ~30 degrees but are rejected by the stack check anyway;
#: coronal and sagittal reformats are at 90. 10 degrees admits slightly oblique axial planes.
AXIAL_MAX_ANGLE_DEG = 10.0
#: Thicknesses closer than this count as equal, so slice count decides between them.
THICKNESS_TOLERANCE_MM = 0.01


@dataclass(frozen=True)
class SeriesDecision:
    """One series and whether it was chosen; ``reason`` says why not (None when chosen)."""

    series_uid: str
    series_number: int | None
    description: str
    slice_count: int
    slice_spacing_mm: float | None
    thickness: float | None
    chosen: bool
    reason: str | None

    @property
    def label(self) -> str:
        return series_label(self.series_number)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SeriesSelection:
    """The chosen series UID (None when nothing is usable) and a decision for every series."""

    chosen: str | None
    decisions: list[SeriesDecision] = field(default_factory=list)

    def reason_if_none(self) -> str | None:
        """One admin-readable line saying why no series was chosen (None when one was)."""
        if self.chosen is not None:
            return None
        if not self.decisions:
            return "no usable series: the study has no image instances"
        return "no usable series: " + "; ".join(f"{d.label} ({d.reason})" for d in self.decisions)

    def require(self) -> str:
        """The chosen series UID, or NoUsableSeriesError carrying :meth:`reason_if_none`."""
        if self.chosen is None:
            raise NoUsableSeriesError(self.reason_if_none() or "no usable series")
        return self.chosen


def select_series(slices: Sequence[SliceHeader], *, min_slices: int = 32) -> SeriesSelection:
    """Pick the thinnest usable axial CT series (then the one with most slices).

    Usable: modality CT, not a localizer, every instance has pixel data, slice normal within
    AXIAL_MAX_ANGLE_DEG of the head-foot axis, at least ``min_slices`` slices, and a geometry
    the volume loader accepts (same size/spacing/orientation, no duplicate positions, uniform
    spacing, no tilt; see ``models.dicom_headers.stack_geometry``).
    """
    groups: dict[str, dict[tuple[str, int | None], SliceHeader]] = {}
    for i, h in enumerate(slices):  # the same instance received twice counts once
        key = (h.sop_instance_uid, h.frame) if h.sop_instance_uid else (f"#{i}", None)
        groups.setdefault(h.series_uid, {}).setdefault(key, h)

    candidates = []
    for uid, by_key in groups.items():
        headers = list(by_key.values())
        first = headers[0]
        numbers = [h.series_number for h in headers if h.series_number is not None]
        thicknesses = [h.slice_thickness for h in headers if h.slice_thickness is not None]
        candidates.append(
            {
                "series_uid": uid,
                "series_number": numbers[0] if numbers else None,
                "description": first.series_description,
                "slice_count": len(headers),
                "slice_spacing_mm": _spacing_estimate(headers),
                "thickness": float(np.median(thicknesses)) if thicknesses else None,
                "reason": _rejection(headers, min_slices),
            }
        )
    candidates.sort(key=lambda c: (c["series_number"] is None, c["series_number"] or 0, c["series_uid"]))

    usable = [c for c in candidates if c["reason"] is None]
    usable.sort(key=lambda c: (_effective_thickness(c), -c["slice_count"], c["slice_spacing_mm"] or math.inf))
    best = usable[0] if usable else None
    decisions = []
    for c in candidates:
        reason = c.pop("reason")
        if best is not None and c is not best and reason is None:
            reason = _beaten_by(c, best)
        decisions.append(SeriesDecision(chosen=c is best, reason=reason, **c))
    return SeriesSelection(chosen=best["series_uid"] if best else None, decisions=decisions)


def _rejection(headers: list[SliceHeader], min_slices: int) -> str | None:
    """Why this series cannot be scored, or None."""
    modalities = sorted({h.modality for h in headers})
    if modalities != ["CT"]:
        others = [m or "missing" for m in modalities if m != "CT"]
        return f"modality {'/'.join(others)} is not CT"
    if any("LOCALIZER" in h.image_type for h in headers):
        return "localizer/scout (ImageType LOCALIZER)"
    without_pixels = len({h.sop_instance_uid for h in headers if not h.has_pixel_data})
    if without_pixels:
        return f"{without_pixels} instance{'s' if without_pixels > 1 else ''} without pixel data"
    orientation = headers[0].orientation
    if orientation is None or any(h.orientation is None for h in headers):
        return "no ImageOrientationPatient: cannot tell whether it is axial"
    try:
        normal = slice_normal(orientation)
    except VolumeError as exc:
        return str(exc)
    angle = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    if angle > AXIAL_MAX_ANGLE_DEG:
        values = ",".join(f"{v:.3g}" for v in orientation)
        return f"not axial (slice normal {angle:.0f} degrees from the head-foot axis; orientation {values})"
    if len(headers) < min_slices:
        return f"{len(headers)} slice{'s' if len(headers) != 1 else ''}, fewer than {min_slices}"
    try:
        stack_geometry(headers)
    except VolumeError as exc:
        return str(exc)
    return None


def _spacing_estimate(headers: list[SliceHeader]) -> float | None:
    """Median step between positions along the normal, for display (None when unknown)."""
    ori = headers[0].orientation
    positions = [h.position for h in headers if h.position is not None]
    if ori is None or len(positions) < 2:
        return None
    try:
        normal = slice_normal(ori)
    except VolumeError:
        return None
    steps = np.diff(np.sort(np.asarray(positions, dtype=float) @ normal))
    return round(float(np.median(steps)), 4)


def _effective_thickness(c: dict[str, Any]) -> float:
    """Thickness where recorded, else the slice spacing (what ranks series by sharpness)."""
    value = c["thickness"] if c["thickness"] is not None else c["slice_spacing_mm"]
    return math.inf if value is None else float(value)


def _beaten_by(c: dict[str, Any], best: dict[str, Any]) -> str:
    label = series_label(best["series_number"])
    mine, theirs = _effective_thickness(c), _effective_thickness(best)
    if mine > theirs + THICKNESS_TOLERANCE_MM:
        return f"thicker slices than {label} ({mine:.1f} mm vs {theirs:.1f} mm)"
    if c["slice_count"] < best["slice_count"]:
        return f"fewer slices than {label} ({c['slice_count']} vs {best['slice_count']})"
    return f"equivalent to {label}, which was preferred"
