"""Choose the one series of a study that gets scored, and say why every other one was not.

A CT study typically holds a localizer, thin and thick axial reconstructions, reformats and
sometimes dose reports. Scoring wants the thinnest axial CT stack that covers a chest; admins want
to know why a study was skipped, so each passed-over series gets a plain reason.

Whether a stack covers a chest is a matter of millimetres, not of slice count: a whole chest at
8 mm is 30 slices, a 20-slice 3 mm series is a 6 cm slab. So the gate is the head-foot extent the
series shows (:func:`coverage_mm`) and the step between its slices, with limits from settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from models.dicom_headers import MAX_FRAMES, SliceHeader, StackGeometry, series_label, slice_normal, stack_geometry
from models.errors import (
    ImplausibleFrameCountError,
    ImplausibleMatrixError,
    ImplausiblePixelSpacingError,
    ImplausibleSliceSpacingError,
    NoUsableSeriesError,
    UnusableImageError,
    VolumeError,
    VolumeTooLargeError,
)

if TYPE_CHECKING:
    from app.settings import Settings

#: A series is axial when its slice normal is within this angle of the patient's head-foot axis.
#: Gantry-tilted axial scans are within ~30 degrees but are rejected by the stack check anyway;
#: coronal and sagittal reformats are at 90. 10 degrees admits slightly oblique axial planes.
AXIAL_MAX_ANGLE_DEG = 10.0
#: Thicknesses closer than this count as equal, so slice count decides between them.
THICKNESS_TOLERANCE_MM = 0.01
#: Head-foot extent a series must cover to be scored: lungs are about 20-30 cm apex to base, and
#: severity is a share of each lung, so a slab of them would give a share of the wrong whole.
MIN_COVERAGE_MM = 150.0
#: Largest step between slices scored: beyond it, lesions of a few centimetres fall between slices.
MAX_SLICE_SPACING_MM = 10.0
#: Reasons print millimetres to 0.1 mm; a value that prints equal to its limit passes.
PRINT_TOLERANCE_MM = 0.05
#: Plausible geometry of a chest CT (defaults of the settings of the same names): pixels of
#: 0.1-12 mm, slices at least 0.1 mm apart, matrices of 16-2048, at most MAX_FRAMES slices, and
#: voxel counts a worker can hold. Checked from the headers, before any pixel is loaded. Real chest
#: CT pixels are 0.5-1.5 mm; 12 mm leaves room for the coarse 32-64 pixel phantoms of the tests and
#: demo, and rejects the 25 mm study that took a worker to 6.2 GB.
MIN_PIXEL_SPACING_MM = 0.1
MAX_PIXEL_SPACING_MM = 12.0
MIN_SLICE_SPACING_MM = 0.1
MIN_MATRIX = 16
MAX_MATRIX = 2048
MAX_VOLUME_VOXELS = 600_000_000
MAX_SCORING_VOXELS = 64_000_000
INPLANE_SPACING_MM = 2.0
#: Peak bytes scoring holds per scoring-grid voxel (measured: 6.2 GB for 25.6 M voxels), for reasons.
BYTES_PER_SCORING_VOXEL = 250


@dataclass(frozen=True)
class SeriesCriteria:
    """How much chest a series must show to be scored (``CTTRIAGE_MIN_COVERAGE_MM`` and
    ``CTTRIAGE_MAX_SLICE_SPACING_MM``); the ranking among usable series does not depend on it."""

    min_coverage_mm: float = MIN_COVERAGE_MM
    max_slice_spacing_mm: float = MAX_SLICE_SPACING_MM
    inplane_spacing_mm: float = INPLANE_SPACING_MM
    min_pixel_spacing_mm: float = MIN_PIXEL_SPACING_MM
    max_pixel_spacing_mm: float = MAX_PIXEL_SPACING_MM
    min_slice_spacing_mm: float = MIN_SLICE_SPACING_MM
    min_matrix: int = MIN_MATRIX
    max_matrix: int = MAX_MATRIX
    max_volume_voxels: int = MAX_VOLUME_VOXELS
    max_scoring_voxels: int = MAX_SCORING_VOXELS

    @classmethod
    def from_settings(cls, settings: Settings) -> SeriesCriteria:
        return cls(min_coverage_mm=settings.min_coverage_mm, max_slice_spacing_mm=settings.max_slice_spacing_mm,
                   inplane_spacing_mm=settings.inplane_spacing_mm,
                   min_pixel_spacing_mm=settings.min_pixel_spacing_mm,
                   max_pixel_spacing_mm=settings.max_pixel_spacing_mm,
                   min_slice_spacing_mm=settings.min_slice_spacing_mm, min_matrix=settings.min_matrix,
                   max_matrix=settings.max_matrix, max_volume_voxels=settings.max_volume_voxels,
                   max_scoring_voxels=settings.max_scoring_voxels)


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
    #: What :meth:`require` raises when nothing is chosen: the typed error of the first series
    #: passed over for implausible geometry or size (its own reason code), else NoUsableSeriesError.
    error: type[UnusableImageError] = NoUsableSeriesError

    def reason_if_none(self) -> str | None:
        """One admin-readable line saying why no series was chosen (None when one was)."""
        if self.chosen is not None:
            return None
        if not self.decisions:
            return "no usable series: the study has no image instances"
        return "no usable series: " + "; ".join(f"{d.label} ({d.reason})" for d in self.decisions)

    def require(self) -> str:
        """The chosen series UID, or :attr:`error` (NoUsableSeriesError unless a series was passed over
        for implausible geometry or size) carrying :meth:`reason_if_none`."""
        if self.chosen is None:
            raise self.error(self.reason_if_none() or "no usable series")
        return self.chosen


def select_series(slices: Sequence[SliceHeader], criteria: SeriesCriteria = SeriesCriteria()) -> SeriesSelection:
    """Pick the thinnest usable axial CT series (then the one with most slices).

    Usable: modality CT, not a localizer, every instance has pixel data, slice normal within
    AXIAL_MAX_ANGLE_DEG of the head-foot axis, a geometry the volume loader accepts (at least 2
    slices of the same size/spacing/orientation, no duplicate positions, uniform spacing, no
    tilt; see ``models.dicom_headers.stack_geometry``), at least ``criteria.min_coverage_mm`` of
    :func:`coverage_mm` and slices at most ``criteria.max_slice_spacing_mm`` apart.
    """
    groups: dict[str, dict[tuple[str, int | None], SliceHeader]] = {}
    for i, h in enumerate(slices):  # the same instance received twice counts once
        key = (h.sop_instance_uid, h.frame) if h.sop_instance_uid else (f"#{i}", None)
        groups.setdefault(h.series_uid, {}).setdefault(key, h)

    found: list[SeriesDecision] = []  # each series weighed alone: reason None when usable
    errors: dict[str, type[UnusableImageError]] = {}  # the typed error behind a series' reason
    for uid, by_key in groups.items():
        headers = list(by_key.values())
        numbers = [h.series_number for h in headers if h.series_number is not None]
        thickness = _median_thickness(headers)
        verdict = _rejection(headers, thickness, criteria)
        if isinstance(verdict, UnusableImageError):
            errors[uid] = type(verdict)
        found.append(SeriesDecision(
            series_uid=uid,
            series_number=numbers[0] if numbers else None,
            description=headers[0].series_description,
            slice_count=len(headers),
            slice_spacing_mm=_spacing_estimate(headers),
            thickness=thickness,
            chosen=False,
            reason=None if verdict is None else str(verdict),
        ))
    found.sort(key=lambda d: (d.series_number is None, d.series_number or 0, d.series_uid))

    usable = [d for d in found if d.reason is None]
    usable.sort(key=lambda d: (_effective_thickness(d), -d.slice_count, d.slice_spacing_mm or math.inf))
    best = usable[0] if usable else None
    decisions = [
        replace(d, chosen=True) if d is best
        else replace(d, reason=_beaten_by(d, best)) if best is not None and d.reason is None
        else d
        for d in found
    ]
    typed = [errors[d.series_uid] for d in found if d.series_uid in errors]
    return SeriesSelection(chosen=best.series_uid if best else None, decisions=decisions,
                           error=typed[0] if best is None and typed else NoUsableSeriesError)


def _rejection(headers: list[SliceHeader], thickness: float | None,
               criteria: SeriesCriteria) -> str | UnusableImageError | None:
    """Why this series cannot be scored, or None (``thickness``: its median SliceThickness).
    Implausible geometry and sizes come as typed errors, so a study with nothing else to score
    is rejected with their reason code."""
    modalities = sorted({h.modality for h in headers})
    if modalities != ["CT"]:
        others = [m or "missing" for m in modalities if m != "CT"]
        return f"modality {'/'.join(others)} is not CT"
    if any("LOCALIZER" in h.image_type for h in headers):
        return "localizer/scout (ImageType LOCALIZER)"
    without_pixels = len({h.sop_instance_uid for h in headers if not h.has_pixel_data})
    if without_pixels:
        return f"{without_pixels} instance{'s' if without_pixels > 1 else ''} without pixel data"
    implausible = implausible_frames(headers, criteria)
    if implausible is not None:
        return implausible
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
    if len(headers) == 1:  # no step to measure: the slice's own thickness is all it covers
        return _too_short(thickness or 0.0, "1 slice" + _thick(thickness), criteria)
    try:
        geometry = stack_geometry(headers)
    except VolumeError as exc:
        return str(exc)
    covered = coverage_mm(geometry, thickness)
    step = geometry.slice_spacing_mm
    if step < criteria.min_slice_spacing_mm:
        return ImplausibleSliceSpacingError(f"slices {step:.3g} mm apart, less than the "
                                            f"{criteria.min_slice_spacing_mm:g} mm of any CT")
    too_large = too_many_voxels(len(headers), geometry.rows, geometry.columns, geometry.pixel_spacing, criteria)
    if too_large is not None:
        return too_large
    if covered < criteria.min_coverage_mm - PRINT_TOLERANCE_MM:
        return _too_short(covered, f"{len(headers)} slices {step:.1f} mm apart{_thick(thickness)}", criteria)
    if step > criteria.max_slice_spacing_mm + PRINT_TOLERANCE_MM:
        return f"slices {step:.1f} mm apart, more than {criteria.max_slice_spacing_mm:.1f} mm"
    return None


def implausible_frames(headers: Sequence[SliceHeader], criteria: SeriesCriteria) -> UnusableImageError | None:
    """The first header fact no chest CT has (slice count, matrix, pixel spacing), or None.

    From the headers alone: the volume loader and the resampling to the scoring grid would
    otherwise allocate what these numbers ask for (PixelSpacing 1e6 asks for petabytes).
    """
    if len(headers) > MAX_FRAMES:
        return ImplausibleFrameCountError(f"{len(headers)} slices, more than the {MAX_FRAMES} accepted")
    lo, hi = criteria.min_matrix, criteria.max_matrix
    for h in headers:
        if not (lo <= h.rows <= hi and lo <= h.columns <= hi):
            return ImplausibleMatrixError(f"{h.rows}x{h.columns} pixels (Rows x Columns), outside {lo}-{hi}")
    lo_mm, hi_mm = criteria.min_pixel_spacing_mm, criteria.max_pixel_spacing_mm
    for h in headers:
        if h.pixel_spacing is not None and not all(lo_mm <= v <= hi_mm for v in h.pixel_spacing):
            values = "\\".join(f"{v:g}" for v in h.pixel_spacing)
            return ImplausiblePixelSpacingError(f"PixelSpacing {values} mm, outside {lo_mm:g}-{hi_mm:g} mm")
    return None


def too_many_voxels(slices: int, rows: int, columns: int, pixel_spacing: Sequence[float],
                    criteria: SeriesCriteria) -> VolumeTooLargeError | None:
    """VolumeTooLargeError when the stored volume or its scoring grid (resampled in-plane to
    ``criteria.inplane_spacing_mm``) has more voxels than the criteria allow; else None."""
    stored = slices * rows * columns
    if stored > criteria.max_volume_voxels:
        return VolumeTooLargeError(f"{slices} x {rows} x {columns} = {stored:,} voxels, more than the "
                                   f"{criteria.max_volume_voxels:,} allowed (CTTRIAGE_MAX_VOLUME_VOXELS)")
    target = criteria.inplane_spacing_mm
    grid = (slices * math.ceil(rows * abs(pixel_spacing[0]) / target)
            * math.ceil(columns * abs(pixel_spacing[1]) / target))
    if grid > criteria.max_scoring_voxels:
        gib = grid * BYTES_PER_SCORING_VOXEL / 2**30
        return VolumeTooLargeError(f"{grid:,} voxels on the {target:g} mm scoring grid (about {gib:.0f} GiB to "
                                   f"score), more than the {criteria.max_scoring_voxels:,} allowed "
                                   f"(CTTRIAGE_MAX_SCORING_VOXELS)")
    return None


def coverage_mm(geometry: StackGeometry, thickness: float | None) -> float:
    """Head-foot extent a stack shows: lowest slice's lower edge to the highest one's upper edge.

    That is (n - 1) x spacing + one slice thickness (the spacing where SliceThickness is not
    recorded), measured along the slice normal, which an axial series has within
    AXIAL_MAX_ANGLE_DEG of the head-foot axis. It is what the images show of the patient; it
    does not depend on how finely that is sliced.
    """
    return geometry.offsets_mm[-1] - geometry.offsets_mm[0] + (thickness or geometry.slice_spacing_mm)


def _median_thickness(headers: list[SliceHeader]) -> float | None:
    """Median recorded SliceThickness (None when none is recorded; zero or negative are not)."""
    values = [h.slice_thickness for h in headers if h.slice_thickness is not None and h.slice_thickness > 0]
    return float(np.median(values)) if values else None


def _thick(thickness: float | None) -> str:
    return f", {thickness:.1f} mm thick" if thickness else ", no SliceThickness"


def _too_short(covered: float, detail: str, criteria: SeriesCriteria) -> str:
    return (f"covers {covered:.1f} mm along the head-foot axis, less than the {criteria.min_coverage_mm:.1f} mm "
            f"a chest needs: {detail}")


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


def _effective_thickness(c: SeriesDecision) -> float:
    """Thickness where recorded, else the slice spacing (what ranks series by sharpness)."""
    value = c.thickness if c.thickness is not None else c.slice_spacing_mm
    return math.inf if value is None else float(value)


def _beaten_by(c: SeriesDecision, best: SeriesDecision) -> str:
    label = series_label(best.series_number)
    mine, theirs = _effective_thickness(c), _effective_thickness(best)
    if mine > theirs + THICKNESS_TOLERANCE_MM:
        return f"thicker slices than {label} ({mine:.1f} mm vs {theirs:.1f} mm)"
    if c.slice_count < best.slice_count:
        return f"fewer slices than {label} ({c.slice_count} vs {best.slice_count})"
    return f"equivalent to {label}, which was preferred"
