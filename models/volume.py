"""Stack one CT series into a Hounsfield-unit volume in one canonical orientation.

Everything downstream (lung side, severity per lung) assumes the patient's left is at high
axis-2 indices. Scanners store slices in either order and may mirror rows or columns, so the
loader reorients from the DICOM geometry instead of trusting the pixel layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

from models.dicom_headers import (
    SliceHeader,
    functional_group_item,
    series_label,
    slice_headers,
    slice_normal,
    stack_geometry,
)
from models.errors import MissingPixelDataError, PixelDecodeError, VolumeError

#: What padding pixels (outside the reconstruction circle) become: air.
AIR_HU = -1000.0
#: Canonical axis k runs along this LPS component: 0 -> z (superior), 1 -> y (posterior),
#: 2 -> x (patient left).
_CANONICAL_LPS_COMPONENT = (2, 1, 0)

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class CtVolume:
    """HU volume in canonical orientation: axis 0 inferior->superior, 1 anterior->posterior,
    2 patient right->left.

    ``origin`` is the LPS position (mm) of voxel [0, 0, 0]; ``direction[k]`` the LPS unit vector
    along which axis k's index grows (close to +z, +y, +x, exactly those for non-oblique scans).
    """

    hu: np.ndarray  # float32, (z, y, x)
    spacing: Vec3  # mm along axes 0, 1, 2
    origin: Vec3
    direction: tuple[Vec3, Vec3, Vec3]

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix mapping (i0, i1, i2, 1) voxel indices to LPS millimetres."""
        out = np.eye(4)
        for k in range(3):
            out[:3, k] = np.asarray(self.direction[k]) * self.spacing[k]
        out[:3, 3] = self.origin
        return out


@dataclass(frozen=True)
class _Frame:
    dataset: Dataset
    frame: int | None
    header: SliceHeader


@dataclass(frozen=True)
class StackLayout:
    """Where each stored frame lies in the canonical volume. :func:`hu_volume` fills the volume
    through it; a writer of derived pixels (``cttriage implant``) maps canonical arrays back to
    the stored frames through the same one, so the two can never disagree on order or flips."""

    frames: tuple[_Frame, ...]  # in rank order: sorted along the slice normal
    canon_of_source: tuple[int, int, int]  # for source axes (rank, row, column), the canonical axis
    flips: tuple[bool, bool, bool]  # per canonical axis, whether it runs against the source axis

    def source_view(self, canonical: np.ndarray) -> np.ndarray:
        """A view of a canonical (z, y, x) array indexed [rank, row, column] like the stored frames."""
        flipped = canonical[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]
        return flipped.transpose(self.canon_of_source)

    def stored(self, rank: int) -> tuple[Dataset, int | None]:
        """The dataset and frame number (None: single-frame) stored at ``rank``."""
        frame = self.frames[rank]
        return frame.dataset, frame.frame


def hu_volume(datasets: Sequence[Dataset]) -> CtVolume:
    """Decode, rescale and stack the instances of one series into a canonical :class:`CtVolume`.

    Raises MissingPixelDataError, PixelDecodeError, SliceGapError, DuplicatePositionError,
    MixedGeometryError, GantryTiltError, or VolumeError (fewer than 2 slices, mixed series,
    missing geometry). Allocates the float32 output once and fills it frame by frame.
    """
    return _stack(datasets)[0]


def stack_layout(datasets: Sequence[Dataset]) -> tuple[CtVolume, StackLayout]:
    """:func:`hu_volume` and how its voxels map to the stored frames (same checks and errors)."""
    return _stack(datasets)


def _stack(datasets: Sequence[Dataset]) -> tuple[CtVolume, StackLayout]:
    per_instance = [(ds, slice_headers(ds)) for ds in datasets]
    frames = [_Frame(ds, h.frame, h) for ds, headers in per_instance for h in headers]
    if not frames:
        raise VolumeError("no instances to build a volume from")
    headers = [f.header for f in frames]
    label = series_label(headers[0].series_number)
    series = {h.series_uid for h in headers}
    if len(series) > 1:
        raise VolumeError(f"{label}: instances of {len(series)} different series given for one volume")
    missing = sum(1 for _, hs in per_instance if not hs[0].has_pixel_data)
    if missing:
        raise MissingPixelDataError(f"{label}: {missing} of {len(datasets)} instances have no pixel data")

    geom = stack_geometry(headers, label=label)
    # Source axes: 0 = slices sorted along the normal, 1 = rows, 2 = columns.
    orientation = np.asarray(geom.orientation, dtype=float)
    source_dirs = [slice_normal(geom.orientation), orientation[3:6], orientation[:3]]
    source_spacing = (geom.slice_spacing_mm, geom.pixel_spacing[0], geom.pixel_spacing[1])
    source_shape = (len(frames), geom.rows, geom.columns)
    canon_of_source, flips = _canonical_axes(source_dirs, label)
    layout = StackLayout(tuple(frames[idx] for idx in geom.order), canon_of_source, flips)

    shape = [0, 0, 0]
    spacing = [0.0, 0.0, 0.0]
    for src, canon in enumerate(canon_of_source):
        shape[canon] = source_shape[src]
        spacing[canon] = float(source_spacing[src])
    out = np.empty(shape, dtype=np.float32)
    source_view = layout.source_view(out)  # indexes `out` in source axis order

    for rank, frame in enumerate(layout.frames):
        _fill_frame(source_view[rank], frame, rank, len(frames), label)

    # LPS position of canonical voxel [0, 0, 0], i.e. the source index at each flipped axis' far end.
    first = layout.frames[0].header.position
    assert first is not None
    origin = np.asarray(first, dtype=float)
    direction: list[Vec3] = [(0.0, 0.0, 0.0)] * 3
    for src, canon in enumerate(canon_of_source):
        step = source_dirs[src] * source_spacing[src]
        if flips[canon]:
            origin = origin + step * (source_shape[src] - 1)
        d = -source_dirs[src] if flips[canon] else source_dirs[src]
        direction[canon] = (float(d[0]) + 0.0, float(d[1]) + 0.0, float(d[2]) + 0.0)  # no -0.0
    volume = CtVolume(
        hu=out,
        spacing=(spacing[0], spacing[1], spacing[2]),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=(direction[0], direction[1], direction[2]),
    )
    return volume, layout


def _canonical_axes(
    source_dirs: Sequence[np.ndarray], label: str
) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """For each source axis, the canonical axis it becomes; per canonical axis, whether it is reversed."""
    dominant = [int(np.argmax(np.abs(d))) for d in source_dirs]
    if sorted(dominant) != [0, 1, 2]:
        raise VolumeError(f"{label}: orientation too oblique to tell axial, coronal and sagittal apart")
    canon_of_source = tuple(_CANONICAL_LPS_COMPONENT.index(c) for c in dominant)
    flips = [False, False, False]
    for src, canon in enumerate(canon_of_source):
        flips[canon] = bool(source_dirs[src][dominant[src]] < 0)
    return (canon_of_source[0], canon_of_source[1], canon_of_source[2]), (flips[0], flips[1], flips[2])


def _fill_frame(dest: np.ndarray, frame: _Frame, rank: int, total: int, label: str) -> None:
    """Decode one frame into ``dest`` (a view of the output) as HU."""
    ds = frame.dataset
    where = f"{label}: slice {rank + 1} of {total}"
    try:
        raw = pixel_array(ds, index=frame.frame)
    except Exception as exc:  # decoders raise many types; all mean the same to an admin
        raise PixelDecodeError(f"{where}: pixel data cannot be decoded ({_short(exc)})") from exc
    if raw.shape != dest.shape:
        raise PixelDecodeError(f"{where}: decoded {raw.shape} pixels, header says {dest.shape}")
    slope, intercept = rescale(ds, frame.frame)
    np.copyto(dest, raw, casting="unsafe")
    if slope != 1.0:
        dest *= np.float32(slope)
    if intercept != 0.0:
        dest += np.float32(intercept)
    padding = ds.get("PixelPaddingValue")
    if padding is not None:
        limit = ds.get("PixelPaddingRangeLimit")
        low, high = (padding, padding) if limit is None else (min(padding, limit), max(padding, limit))
        dest[(raw >= low) & (raw <= high)] = AIR_HU


def rescale(ds: Dataset, frame: int | None) -> tuple[float, float]:
    """RescaleSlope/Intercept for a frame (functional groups first, then the top level)."""
    item = functional_group_item(ds, frame, "PixelValueTransformationSequence") if frame is not None else None
    source = item if item is not None and "RescaleSlope" in item else ds
    slope = source.get("RescaleSlope")
    intercept = source.get("RescaleIntercept")
    return (1.0 if slope is None else float(slope)), (0.0 if intercept is None else float(intercept))


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
