"""Synthetic chest CT phantoms with exact ground truth: the anatomy as arrays (``models.phantom_dicom``
writes them as DICOM series).

Real annotated chest CT cannot ship with the project, yet every stage (listener, selection,
loader, segmentation, severity) needs data whose true answer is known. The phantom is drawn from
analytic shapes in patient millimetres (LPS, head-first supine), so any matrix size, slice
spacing, orientation or transfer syntax shows the same anatomy and the truth comes from the
label masks that produced the pixels.

Arrays of a :class:`PhantomVolume` are in the loader's canonical orientation (axis 0 inferior to
superior, 1 anterior to posterior, 2 patient right to left), so they compare directly with
``models.volume.hu_volume``; ``flip_lr`` only changes how the slices are written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from models.lungs_threshold import LEFT_LUNG, RIGHT_LUNG

# --- tissue labels and their HU ------------------------------------------------------------

AIR, SOFT_TISSUE, FAT, BONE, BONE_SPONGY, TABLE, LUNG, VESSEL, AIRWAY_WALL, AIRWAY_LUMEN, BLOOD = range(11)
TISSUE_HU = np.array([-1000, 40, -100, 800, 350, 100, -850, 40, 40, -1000, 50], dtype=np.int16)
#: Lesion labels in ``PhantomVolume.lesions``.
GGO, CONSOLIDATION = 1, 2
GGO_HU_RANGE = (-650.0, -560.0)
CONSOLIDATION_HU_RANGE = (-70.0, -30.0)
HU_CLIP = (-1024, 3071)  # what a 12-bit scanner can represent with intercept -1024

#: Transfer syntaxes a spec may ask the phantom to be written in (``models.phantom_dicom``).
UNCOMPRESSED_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
COMPRESSED_SYNTAXES = (RLELossless, JPEG2000Lossless)

# --- anatomy (mm, for a 360 mm field of view; smaller fields scale the cross-section) --------

REFERENCE_FOV_MM = 360.0
BODY_SEMI_AXES = (170.0, 125.0)
FAT_THICKNESS = 12.0
TABLE_GAP, TABLE_THICKNESS, TABLE_HALF_WIDTH = 6.0, 10.0, 160.0
#: Lung centre x is +-LUNG_CENTRE_X (patient left is +x); semi-axes per side (x, y).
LUNG_CENTRE_X, LUNG_CENTRE_Y = 72.0, 8.0
LUNG_SEMI_AXES = {RIGHT_LUNG: (52.0, 78.0), LEFT_LUNG: (48.0, 76.0)}
#: Lung height (apex to base) is at most this; shorter coverages squash the lungs to fit.
LUNG_MAX_HEIGHT_MM = 240.0
#: Relative height where the cross-section is widest; the base is cut below it (flat base),
#: the apex tapers above it.
LUNG_WIDEST_AT, LUNG_BASE_EXTENT = 0.3, 0.35
#: Diaphragm dome under each lung: centred medially so low slices show a crescent open towards
#: the mediastinum, as in real CT (a closed ring would make a spurious hole in lung masks).
DOME_HEIGHT_FRACTION, DOME_RADIUS, DOME_MEDIAL_SHIFT = 0.16, 50.0, 0.45
TRACHEA_XY, TRACHEA_LUMEN_RADIUS = (0.0, 30.0), 8.0
BRONCHUS_LUMEN_RADIUS, AIRWAY_WALL_MM = 5.5, 2.0
CARINA_AT, HILUM_AT = 0.62, 0.5
BRONCHUS_INTO_LUNG_MM = 4.0
SPINE_XY, SPINE_RADIUS, CORTEX_MM = (0.0, 82.0), 17.0, 2.5
AORTA_XY, AORTA_RADIUS = (20.0, 60.0), 12.0
RIB_RADIUS, RIB_CLEARANCE, RIB_PERIOD_FRACTION, RIB_BAND_FRACTION = 4.5, 9.0, 0.12, 0.045
VESSELS_PER_LUNG, VESSEL_RADIUS_MM, VESSEL_CLEARANCE_MM = 8, (1.0, 2.0), 4.0
#: Lesion radii (mm): the largest grows with the target so that heavy disease converges fast.
LESION_RADIUS_MIN, LESION_RADIUS_MAX, LESION_RADIUS_MAX_AT_100 = 10.0, 16.0, 40.0
#: Consolidation keeps this much lung around it in-plane (and a slice in z): threshold lung
#: masks cannot see dense tissue touching the chest wall, so the truth must not put it there.
CONSOLIDATION_CLEARANCE_MM = 5.0
#: Stop adding lesions within this fraction of the lung (percent points) of the target.
SEVERITY_TOLERANCE_PCT = 0.2
FIRST_SLICE_Z_MM = -350.0


@dataclass(frozen=True)
class PhantomSpec:
    """What to generate. Severities are target percentages of each lung covered by lesions.

    The series covers ``slices * slice_spacing`` mm head to foot; the default (96 mm) is a slab,
    which the service's series selection rejects (``CTTRIAGE_MIN_COVERAGE_MM``, 150 mm): a phantom
    to be scored needs at least that much.
    """

    slices: int = 64
    rows: int = 512
    columns: int = 512
    pixel_spacing: float = 0.7
    slice_spacing: float = 1.5
    severity_left: float = 0.0
    severity_right: float = 0.0
    consolidation_share: float = 0.3
    noise_hu: float = 15.0
    seed: int = 0
    flip_lr: bool = False
    transfer_syntax: str = ExplicitVRLittleEndian
    #: Also write a thick-slab reconstruction (e.g. 5.0 mm) of the same study as another series.
    thick_series_mm: float | None = None
    #: Also write a localizer (scout) image of the same study.
    scout: bool = False

    def __post_init__(self) -> None:
        if self.slices < 2 or self.rows < 16 or self.columns < 16:
            raise ValueError("a phantom needs at least 2 slices of 16x16 pixels")
        if self.pixel_spacing <= 0 or self.slice_spacing <= 0:
            raise ValueError("spacings must be positive")
        for name in ("severity_left", "severity_right"):
            if not 0.0 <= getattr(self, name) <= 95.0:
                raise ValueError(f"{name} must be within 0..95 percent")
        if not 0.0 <= self.consolidation_share <= 1.0:
            raise ValueError("consolidation_share must be within 0..1")
        if self.transfer_syntax not in UNCOMPRESSED_SYNTAXES + COMPRESSED_SYNTAXES:
            allowed = UNCOMPRESSED_SYNTAXES + COMPRESSED_SYNTAXES
            names = ", ".join(f"{uid} ({UID(uid).name})" for uid in allowed)
            raise ValueError(
                f"transfer syntax {self.transfer_syntax} is not supported by the phantom; use one of {names}"
            )


@dataclass(frozen=True)
class PhantomVolume:
    """A generated phantom: HU and label masks in canonical (z, y, x) order, plus exact truth."""

    hu: np.ndarray  # int16
    lungs: np.ndarray  # uint8: 0, RIGHT_LUNG, LEFT_LUNG (lung region incl. lesions, vessels, in-lung airway)
    lesions: np.ndarray  # uint8: 0, GGO, CONSOLIDATION (always inside a lung)
    tissue: np.ndarray  # uint8 tissue labels (AIR, SOFT_TISSUE, ...)
    spacing: tuple[float, float, float]  # mm (z, y, x)
    truth: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Lung:
    side: int
    cx: float
    cy: float
    ax: float
    ay: float
    base_z: float
    height: float
    dome_x: float
    dome_y: float
    dome_radius: float
    dome_height: float

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray | float, inset: float = 0.0) -> np.ndarray:
        """Whether points (broadcast arrays, mm) lie inside the lung shrunk by ``inset`` mm."""
        t = (np.asarray(z, dtype=np.float32) - self.base_z - inset) / max(self.height - 2 * inset, 1e-3)
        s = _lung_profile(t)
        ax = np.maximum(self.ax * s - inset, 1e-3)
        ay = np.maximum(self.ay * s - inset, 1e-3)
        ellipse = ((x - self.cx) / ax) ** 2 + ((y - self.cy) / ay) ** 2 <= 1.0
        rho2 = (x - self.dome_x) ** 2 + (y - self.dome_y) ** 2
        dome_top = self.dome_height * (1.0 - rho2 / (self.dome_radius + inset) ** 2)
        above_dome = (np.asarray(z) - self.base_z - inset) >= dome_top
        return ellipse & above_dome & (s > 0)


def _lung_profile(t: np.ndarray | np.floating[Any]) -> np.ndarray:
    """Cross-section scale at relative height t: flat-cut base, widest at LUNG_WIDEST_AT, apex at 1."""
    below = 1.0 - ((LUNG_WIDEST_AT - t) / (LUNG_WIDEST_AT + LUNG_BASE_EXTENT)) ** 2
    above = 1.0 - ((t - LUNG_WIDEST_AT) / (1.0 - LUNG_WIDEST_AT)) ** 2
    s2 = np.where(t <= LUNG_WIDEST_AT, below, above)
    return np.where((t >= 0.0) & (t <= 1.0), np.sqrt(np.clip(s2, 0.0, None)), 0.0).astype(np.float32)


@dataclass(frozen=True)
class PhantomGrid:
    """Voxel-centre coordinates (mm, LPS) of the canonical arrays."""

    z: np.ndarray  # (slices,)
    y: np.ndarray  # (rows,)
    x: np.ndarray  # (columns,)
    spacing: tuple[float, float, float]
    scale: float  # in-plane anatomy scale
    fov_radius: float

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Index box covering the mm box [lo, hi] (z, y, x); None when it misses the volume."""
        out = []
        for axis, (a, b) in zip((self.z, self.y, self.x), zip(lo, hi, strict=True), strict=True):
            i0 = int(np.searchsorted(axis, a, side="left"))
            i1 = int(np.searchsorted(axis, b, side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return out[0], out[1], out[2]

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (z, y, x) coordinate arrays of a box."""
        return self.z[box[0]][:, None, None], self.y[box[1]][None, :, None], self.x[box[2]][None, None, :]


def phantom_grid(spec: PhantomSpec) -> PhantomGrid:
    ps, dz = spec.pixel_spacing, spec.slice_spacing
    x = (np.arange(spec.columns) - (spec.columns - 1) / 2) * ps
    y = (np.arange(spec.rows) - (spec.rows - 1) / 2) * ps
    z = FIRST_SLICE_Z_MM + np.arange(spec.slices) * dz
    fov = min(spec.rows, spec.columns) * ps
    return PhantomGrid(z=z, y=y, x=x, spacing=(dz, ps, ps), scale=min(1.0, fov / REFERENCE_FOV_MM), fov_radius=fov / 2)


def _lungs(spec: PhantomSpec, grid: PhantomGrid) -> dict[int, _Lung]:
    extent = spec.slices * spec.slice_spacing
    # At most a quarter of the coverage each side, so a few slices still hold some lung.
    margin = min(max(2 * spec.slice_spacing, 0.04 * extent), extent / 4)
    height = min(LUNG_MAX_HEIGHT_MM, extent - 2 * margin)
    base = float(grid.z[0]) - spec.slice_spacing / 2 + (extent - height) / 2
    s = grid.scale
    out = {}
    for side, sign in ((RIGHT_LUNG, -1.0), (LEFT_LUNG, 1.0)):
        ax, ay = (v * s for v in LUNG_SEMI_AXES[side])
        cx = sign * LUNG_CENTRE_X * s
        out[side] = _Lung(
            side=side,
            cx=cx,
            cy=LUNG_CENTRE_Y * s,
            ax=ax,
            ay=ay,
            base_z=base,
            height=height,
            dome_x=cx - sign * DOME_MEDIAL_SHIFT * ax,
            dome_y=(LUNG_CENTRE_Y - 0.1 * LUNG_SEMI_AXES[side][1]) * s,
            dome_radius=DOME_RADIUS * s,
            dome_height=DOME_HEIGHT_FRACTION * height,
        )
    return out


def phantom_volume(spec: PhantomSpec = PhantomSpec()) -> PhantomVolume:
    """Generate the phantom in memory (pure: the same spec always gives the same arrays)."""
    grid = phantom_grid(spec)
    lungs_geom = _lungs(spec, grid)
    rng = np.random.default_rng([spec.seed, 0])
    shape = (spec.slices, spec.rows, spec.columns)
    tissue = np.empty(shape, dtype=np.uint8)
    lungs = np.zeros(shape, dtype=np.uint8)
    X = grid.x.astype(np.float32)[None, :]
    Y = grid.y.astype(np.float32)[:, None]
    outside_fov = X**2 + Y**2 > grid.fov_radius**2
    static = _static_cross_section(grid, X, Y)
    for k, z in enumerate(grid.z):
        sl = tissue[k]
        sl[...] = static
        _draw_ribs(sl, grid, X, Y, float(z), lungs_geom)
        for side, lung in lungs_geom.items():
            inside = lung.inside(X, Y, float(z))
            sl[inside] = LUNG
            lungs[k][inside] = side
        sl[outside_fov] = AIR
    for lung in lungs_geom.values():
        _draw_vessels(tissue, lungs, grid, lung, rng)
    _draw_airways(tissue, grid, lungs_geom, spec)

    hu = TISSUE_HU[tissue]
    lesions = np.zeros(shape, dtype=np.uint8)
    for side, lung in lungs_geom.items():
        target = spec.severity_left if side == LEFT_LUNG else spec.severity_right
        if target > 0:
            _place_lesions(hu, lesions, tissue, lungs, grid, lung, target, spec.consolidation_share, rng)
    _add_noise(hu, spec, outside_fov)
    truth = _truth(lungs, lesions, tissue, grid.spacing, spec)
    return PhantomVolume(hu=hu, lungs=lungs, lesions=lesions, tissue=tissue, spacing=grid.spacing, truth=truth)


def _static_cross_section(grid: PhantomGrid, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Tissues that do not change along z: body, fat, table, spine, aorta."""
    s = grid.scale
    bx, by = BODY_SEMI_AXES[0] * s, BODY_SEMI_AXES[1] * s
    out = np.full((grid.y.size, grid.x.size), AIR, dtype=np.uint8)
    body = (X / bx) ** 2 + (Y / by) ** 2 <= 1.0
    inner = (X / (bx - FAT_THICKNESS * s)) ** 2 + (Y / (by - FAT_THICKNESS * s)) ** 2 <= 1.0
    out[body] = FAT
    out[inner] = SOFT_TISSUE
    table_top = by + TABLE_GAP * s
    out[(Y >= table_top) & (Y <= table_top + TABLE_THICKNESS * s) & (np.abs(X) <= TABLE_HALF_WIDTH * s)] = TABLE
    r_spine = np.hypot(X - SPINE_XY[0] * s, Y - SPINE_XY[1] * s)
    out[r_spine <= SPINE_RADIUS * s] = BONE
    out[r_spine <= (SPINE_RADIUS - CORTEX_MM) * s] = BONE_SPONGY
    out[np.hypot(X - AORTA_XY[0] * s, Y - AORTA_XY[1] * s) <= AORTA_RADIUS * s] = BLOOD
    return out


def _draw_ribs(sl: np.ndarray, grid: PhantomGrid, X: np.ndarray, Y: np.ndarray, z: float,
               lungs: dict[int, _Lung]) -> None:
    """Rib cross-sections on an arc just outside each lung, in bands that slope along z."""
    for lung in lungs.values():
        rel = (z - lung.base_z) / lung.height
        if not -0.05 <= rel <= 1.0:
            continue
        lateral = -1.0 if lung.cx < 0 else 1.0
        for angle in np.linspace(-0.6 * math.pi, 0.6 * math.pi, 9):
            phase = (rel + 0.03 * math.sin(angle)) % RIB_PERIOD_FRACTION
            if phase > RIB_BAND_FRACTION:
                continue
            px = lung.cx + lateral * (lung.ax + RIB_CLEARANCE * grid.scale) * math.cos(angle)
            py = lung.cy + (lung.ay + RIB_CLEARANCE * grid.scale) * math.sin(angle)
            r = RIB_RADIUS * grid.scale
            sl[(X - px) ** 2 + (Y - py) ** 2 <= r * r] = BONE


def _segment_distance(
    z: np.ndarray, y: np.ndarray, x: np.ndarray, a: np.ndarray, b: np.ndarray
) -> np.ndarray:
    """Distance (mm) from grid points to the segment a-b (points as (z, y, x))."""
    ab = b - a
    denom = float(ab @ ab) or 1e-9
    t = ((z - a[0]) * ab[0] + (y - a[1]) * ab[1] + (x - a[2]) * ab[2]) / denom
    t = np.clip(t, 0.0, 1.0)
    distance: np.ndarray = np.sqrt(
        (z - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (x - a[2] - t * ab[2]) ** 2
    )
    return distance


def _tube_box(grid: PhantomGrid, a: np.ndarray, b: np.ndarray, radius: float) -> tuple[slice, slice, slice] | None:
    return grid.box(np.minimum(a, b) - radius, np.maximum(a, b) + radius)


def _draw_vessels(tissue: np.ndarray, lungs: np.ndarray, grid: PhantomGrid, lung: _Lung,
                  rng: np.random.Generator) -> None:
    """A few thin straight vessels with one branch each, kept clear of the lung boundary."""
    sign = -1.0 if lung.cx < 0 else 1.0
    hilum_z = lung.base_z + HILUM_AT * lung.height
    start = np.array([hilum_z, lung.cy, lung.cx - sign * 0.45 * lung.ax])
    clearance = VESSEL_CLEARANCE_MM * grid.scale

    def random_point() -> np.ndarray:
        for _ in range(100):
            t = rng.uniform(0.1, 0.9)
            z = lung.base_z + t * lung.height
            angle = rng.uniform(0, 2 * math.pi)
            frac = rng.uniform(0.5, 0.9)
            s = float(_lung_profile(np.float32(t)))
            y = lung.cy + frac * s * lung.ay * math.sin(angle)
            x = lung.cx + frac * s * lung.ax * math.cos(angle)
            p = np.array([z, y, x])
            if lung.inside(np.asarray(p[2]), np.asarray(p[1]), p[0], inset=clearance):
                return p
        return start

    for _ in range(VESSELS_PER_LUNG):
        end = random_point()
        radius = rng.uniform(*VESSEL_RADIUS_MM)
        mid = start + rng.uniform(0.3, 0.6) * (end - start)
        for a, b, r in ((start, end, radius), (mid, random_point(), 0.7 * radius)):
            box = _tube_box(grid, a, b, r)
            if box is None:
                continue
            z, y, x = grid.coords(box)
            tube = (_segment_distance(z, y, x, a, b) <= r) & lung.inside(x, y, z, inset=clearance)
            tissue[box][tube & (lungs[box] == lung.side)] = VESSEL


def _draw_airways(tissue: np.ndarray, grid: PhantomGrid, lungs: dict[int, _Lung], spec: PhantomSpec) -> None:
    """Trachea from above the volume down to the carina, main bronchi to each hilum."""
    s = grid.scale
    any_lung = next(iter(lungs.values()))
    carina = np.array([any_lung.base_z + CARINA_AT * any_lung.height, TRACHEA_XY[1] * s, TRACHEA_XY[0] * s])
    top = np.array([float(grid.z[-1]) + 3 * spec.slice_spacing, carina[1], carina[2]])
    tubes = [(carina, top, TRACHEA_LUMEN_RADIUS * s)]
    for lung in lungs.values():
        sign = -1.0 if lung.cx < 0 else 1.0
        hilum_z = lung.base_z + HILUM_AT * lung.height
        medial_edge = lung.cx - sign * lung.ax * float(_lung_profile(np.float32(HILUM_AT)))
        end = np.array([hilum_z, lung.cy, medial_edge + sign * BRONCHUS_INTO_LUNG_MM * s])
        tubes.append((carina, end, BRONCHUS_LUMEN_RADIUS * s))
    wall = AIRWAY_WALL_MM * s
    for label, extra in ((AIRWAY_WALL, wall), (AIRWAY_LUMEN, 0.0)):  # all walls first: lumens join
        for a, b, r in tubes:
            box = _tube_box(grid, a, b, r + extra)
            if box is not None:
                tissue[box][_segment_distance(*grid.coords(box), a, b) <= r + extra] = label


def _place_lesions(
    hu: np.ndarray,
    lesions: np.ndarray,
    tissue: np.ndarray,
    lungs: np.ndarray,
    grid: PhantomGrid,
    lung: _Lung,
    target_pct: float,
    consolidation_share: float,
    rng: np.random.Generator,
) -> None:
    """Add ellipsoidal lesions inside one lung until they cover ``target_pct`` of it."""
    region = (lungs == lung.side) & (tissue != AIRWAY_WALL) & (tissue != AIRWAY_LUMEN)
    lung_voxels = int(np.count_nonzero(lungs == lung.side))
    centres = np.flatnonzero(region)
    if centres.size == 0:
        return
    voxel_mm3 = float(np.prod(grid.spacing))
    target = target_pct / 100.0 * lung_voxels
    tolerance = SEVERITY_TOLERANCE_PCT / 100.0 * lung_voxels
    r_max = LESION_RADIUS_MAX + (LESION_RADIUS_MAX_AT_100 - LESION_RADIUS_MAX) * target_pct / 100.0
    r_floor = max(3.0, 1.5 * max(grid.spacing[1:]))
    clear_xy = max(CONSOLIDATION_CLEARANCE_MM, 2.0 * grid.spacing[1])
    clear_z = max(CONSOLIDATION_CLEARANCE_MM, 1.0 * grid.spacing[0])
    counts = {GGO: 0, CONSOLIDATION: 0}
    goals = ((CONSOLIDATION, consolidation_share * target), (GGO, target))

    for kind, goal in goals:
        misses = 0
        while misses < 400:
            done = counts[CONSOLIDATION] + counts[GGO] if kind == GGO else counts[CONSOLIDATION]
            remaining = goal - done
            if remaining <= (tolerance if kind == GGO else 0.5 * tolerance):
                break
            r_needed = (3.0 * remaining * voxel_mm3 / (4.0 * math.pi)) ** (1 / 3) * 1.1
            radius = max(min(rng.uniform(LESION_RADIUS_MIN, r_max), r_needed), r_floor)
            semi = radius * rng.uniform(0.75, 1.25, size=3)  # (z, y, x)
            centre_idx = np.unravel_index(int(rng.choice(centres)), lungs.shape)
            centre = np.array([grid.z[centre_idx[0]], grid.y[centre_idx[1]], grid.x[centre_idx[2]]], dtype=float)
            pad = np.array([clear_z, clear_xy, clear_xy]) if kind == CONSOLIDATION else np.zeros(3)
            box = grid.box(centre - semi - pad, centre + semi + pad)
            if box is None:
                misses += 1
                continue
            z, y, x = grid.coords(box)
            blob = _ellipsoid(z, y, x, centre, semi)
            allowed = region[box]
            if kind == CONSOLIDATION:
                grown = _ellipsoid(z, y, x, centre, semi + pad)
                touches_edge = any(
                    s.start == 0 or s.stop == n for s, n in zip(box, lungs.shape, strict=True)
                )
                if touches_edge or not np.all(allowed[grown]):
                    misses += 1
                    continue
                new = blob & (lesions[box] != CONSOLIDATION)
                counts[GGO] -= int(np.count_nonzero(new & (lesions[box] == GGO)))
            else:
                new = blob & allowed & (lesions[box] == 0)
            added = int(np.count_nonzero(new))
            if added == 0:
                misses += 1
                continue
            lo, hi = GGO_HU_RANGE if kind == GGO else CONSOLIDATION_HU_RANGE
            lesions[box][new] = kind
            hu[box][new] = np.int16(round(rng.uniform(lo, hi)))
            counts[kind] += added


def _ellipsoid(z: np.ndarray, y: np.ndarray, x: np.ndarray, centre: np.ndarray, semi: np.ndarray) -> np.ndarray:
    """Grid points (broadcast coordinate arrays, mm) inside an axis-aligned ellipsoid."""
    radius2 = ((z - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((x - centre[2]) / semi[2]) ** 2
    inside: np.ndarray = radius2 <= 1.0
    return inside


def _add_noise(hu: np.ndarray, spec: PhantomSpec, outside_fov: np.ndarray) -> None:
    """Gaussian noise slice by slice (bounded memory); no noise outside the reconstruction circle."""
    rng = np.random.default_rng([spec.seed, 1])
    for k in range(hu.shape[0]):
        sl = hu[k].astype(np.float32)
        if spec.noise_hu > 0:
            sl += rng.standard_normal(sl.shape, dtype=np.float32) * np.float32(spec.noise_hu)
        np.clip(np.rint(sl), *HU_CLIP, out=sl)
        sl[outside_fov] = TISSUE_HU[AIR]
        hu[k] = sl.astype(np.int16)


def _truth(
    lungs: np.ndarray, lesions: np.ndarray, tissue: np.ndarray, spacing: tuple[float, float, float], spec: PhantomSpec
) -> dict[str, Any]:
    """Volumes and severities counted from the label masks (not the targets)."""
    ml = float(np.prod(spacing)) / 1000.0
    out: dict[str, Any] = {}
    for name, side in (("left", LEFT_LUNG), ("right", RIGHT_LUNG)):
        in_lung = lungs == side
        lung_ml = np.count_nonzero(in_lung) * ml
        lesion_ml = np.count_nonzero(in_lung & (lesions > 0)) * ml
        out[f"lung_volume_{name}_ml"] = float(lung_ml)
        out[f"lesion_volume_{name}_ml"] = float(lesion_ml)
        out[f"severity_{name}"] = float(100.0 * lesion_ml / lung_ml) if lung_ml else 0.0
    out["severity"] = max(out["severity_left"], out["severity_right"])
    out["ggo_volume_ml"] = float(np.count_nonzero(lesions == GGO) * ml)
    out["consolidation_volume_ml"] = float(np.count_nonzero(lesions == CONSOLIDATION) * ml)
    out["vessel_volume_ml"] = float(np.count_nonzero((tissue == VESSEL) & (lungs > 0) & (lesions == 0)) * ml)
    out["target_severity_left"] = float(spec.severity_left)
    out["target_severity_right"] = float(spec.severity_right)
    out["spacing_mm"] = list(spacing)
    out["shape"] = [int(v) for v in lungs.shape]
    return out
