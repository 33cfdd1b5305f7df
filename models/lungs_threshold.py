"""Classical lung segmentation (no weights): threshold, remove outside air and large airways,
keep the lungs, fill what lies inside them, then split into right and left.

This is the fallback and the reference that needs no model files, and it must work on real CT.
It expects a volume in canonical orientation (axis 0 inferior->superior, axis 1
anterior->posterior, axis 2 patient right->left), ideally resampled to about 2 mm in-plane.

Known limits: dense tissue touching the chest wall (consolidation, effusion) is not lung by
threshold and is only recovered where it is enclosed in a slice or is a shallow dent; a lung
that is entirely white is not found at all.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from models.errors import SegmentationError

#: Labels of :func:`split_lungs` (patient right = low axis-2 indices).
RIGHT_LUNG, LEFT_LUNG = 1, 2

#: Aerated lung, including ground glass (up to about -300 HU), lies below this; soft tissue,
#: blood and consolidation (above 0 HU) above it. -320 is the usual choice between the two modes
#: of a chest CT histogram (air-filled lung about -850, tissue about 40).
LUNG_THRESHOLD_HU = -320.0
#: After smoothing, the lumen of the trachea and main bronchi is close to -1000 HU, while lung
#: parenchyma (alveoli plus blood) stays around -850; these thresholds, tried in turn, separate
#: the two. Stricter ones are the fallback when the first leaks into emphysematous lung.
AIRWAY_THRESHOLDS_HU = (-950.0, -975.0, -990.0)
AIRWAY_SMOOTHING_MM = 1.5
#: Trachea plus main bronchi hold 30-80 mL; an "airway" larger than this has leaked into lung.
AIRWAY_MAX_ML = 250.0
#: Airway seeds lie within this distance of the midline (the trachea is central).
AIRWAY_SEED_HALF_WIDTH_MM = 30.0
#: The airway lumen's partial-volume rim (between -950 and the lung threshold) is airway too;
#: left in place it would connect both lungs through the trachea. Removed in-plane up to here.
AIRWAY_RIM_MM = 3.0
#: Another air component counts as lung if it is at least this share of the largest and
#: reaches the upper half of the largest one (bowel gas sits below the lung bases).
SECOND_LUNG_MIN_SHARE = 0.1
#: Closing radius: fills dents up to about 2x this wide (dense lesions at the lung edge, the
#: hilum) without bridging to other structures; closing runs per lung so lungs never merge.
CLOSING_RADIUS_MM = 4.0
#: Both lungs of an adult hold 3-8 L; below this total the volume is not a usable chest CT.
MIN_TOTAL_LUNG_ML = 300.0
#: Erosion depths (mm) tried to separate lungs that touch (anterior/posterior junction lines).
SPLIT_EROSION_MM = (2.0, 4.0, 6.0, 9.0, 12.0, 16.0, 20.0)
#: Each lung must be at least this share of the pair when two components are taken as lungs.
SPLIT_MIN_SHARE = 0.05
#: A midline valley at most this fraction of the smaller lung peak means two touching lungs.
VALLEY_MAX_RATIO = 0.5

_NO_Z = np.zeros((3, 3), bool)
#: 4-connected within a slice, nothing across slices.
IN_PLANE_STRUCTURE = np.array([_NO_Z, ndimage.generate_binary_structure(2, 1), _NO_Z])
_SLICE_STRUCTURE_8 = np.array([_NO_Z, np.ones((3, 3), bool), _NO_Z])  # 8-connected in-plane only


def segment_lungs(hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Boolean mask of both lungs (lesions, vessels and airways inside them included).

    Raises SegmentationError when no plausible lungs (at least MIN_TOTAL_LUNG_ML) are found.
    """
    air = hu < LUNG_THRESHOLD_HU
    inside_air = air & ~_touches_inplane_border(air)
    del air
    if not inside_air.any():
        raise SegmentationError("no air-filled region inside the body: no lungs in this volume")
    inside_air &= ~_large_airways(hu, inside_air, spacing)
    kept = _lung_components(inside_air, spacing)
    del inside_air
    lungs = np.zeros(hu.shape, dtype=bool)
    for component in kept:
        box, mask = component
        lungs[box] |= _fill_holes_per_slice(_closing(mask, spacing, CLOSING_RADIUS_MM))
    total_ml = np.count_nonzero(lungs) * float(np.prod(spacing)) / 1000.0
    if total_ml < MIN_TOTAL_LUNG_ML:
        raise SegmentationError(
            f"lungs implausibly small: {total_ml / 1000:.2f} L found, expected at least "
            f"{MIN_TOTAL_LUNG_ML / 1000:.1f} L (not a chest CT, or the lungs are not in the scanned range)"
        )
    return lungs


def split_lungs(lung_mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Label the lung mask 1 (right lung, low axis 2) and 2 (left lung, high axis 2).

    Two separate components are taken as they are. Lungs that touch are separated by eroding
    until two cores appear and growing them back; failing that, by the midline valley of the
    mask's left-right profile. A single lung with no valley keeps the side of its centre.
    """
    labels = np.zeros(lung_mask.shape, dtype=np.uint8)
    if not lung_mask.any():
        return labels
    comp, n = ndimage.label(lung_mask)
    sizes = np.bincount(comp.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    seeds: np.ndarray | None
    if n >= 2 and sizes[order[1]] >= SPLIT_MIN_SHARE * (sizes[order[0]] + sizes[order[1]]):
        seeds = np.zeros(lung_mask.shape, dtype=np.uint8)
        first, second = order[0] + 1, order[1] + 1
        right, left = sorted((first, second), key=lambda c: _mean_axis2(comp == c))
        seeds[comp == right] = RIGHT_LUNG
        seeds[comp == left] = LEFT_LUNG
        return _assign_rest(seeds, lung_mask)
    seeds = _split_by_erosion(lung_mask, spacing)
    if seeds is not None:
        return _grow(seeds, lung_mask, spacing)
    return _split_by_valley(lung_mask, spacing)


# --- segmentation steps -------------------------------------------------------------------


def _touches_inplane_border(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` connected, within their slice, to the slice border (air outside the body)."""
    comp, _ = ndimage.label(mask, structure=IN_PLANE_STRUCTURE)
    border = np.unique(
        np.concatenate([comp[:, 0, :].ravel(), comp[:, -1, :].ravel(), comp[:, :, 0].ravel(), comp[:, :, -1].ravel()])
    )
    lookup = np.zeros(int(comp.max()) + 1, dtype=bool)
    lookup[border] = True
    lookup[0] = False
    touching: np.ndarray = lookup[comp]
    return touching


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """``mask`` plus what it encloses in each axial slice (vessels, nodules, enclosed lesions)."""
    background = ~mask
    filled: np.ndarray = mask | (background & ~_touches_inplane_border(background))
    return filled


def _large_airways(hu: np.ndarray, inside_air: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Trachea and main bronchi, so that they neither count as lung nor join the two lungs.

    Seeds: voxels darker than the threshold (after AIRWAY_SMOOTHING_MM Gaussian smoothing) in
    the topmost slice that holds air, within AIRWAY_SEED_HALF_WIDTH_MM of the air's midline (the
    trachea). They grow in 3D through dark voxels down the main bronchi, stopping at parenchyma.
    A result above AIRWAY_MAX_ML has leaked into lung and the next, stricter threshold is
    tried; if all leak, or there is no seed, nothing is removed. The lumen's partial-volume rim
    is then removed in-plane (AIRWAY_RIM_MM).
    """
    none = np.zeros(hu.shape, dtype=bool)
    z_with_air = np.flatnonzero(inside_air.any(axis=(1, 2)))
    top = int(z_with_air[-1])
    x_mm = np.arange(hu.shape[2]) * spacing[2]
    midline = float(np.average(x_mm, weights=inside_air.sum(axis=(0, 1))))
    central = np.abs(x_mm - midline) <= AIRWAY_SEED_HALF_WIDTH_MM
    smoothed = ndimage.gaussian_filter(
        hu.astype(np.float32, copy=False), sigma=[AIRWAY_SMOOTHING_MM / s for s in spacing], mode="nearest"
    )
    voxel_ml = float(np.prod(spacing)) / 1000.0
    for threshold in AIRWAY_THRESHOLDS_HU:
        dark = inside_air & (smoothed < threshold)
        seeds = dark[top] & central[None, :]
        if not seeds.any():
            continue
        comp, _ = ndimage.label(dark)
        ids = np.unique(comp[top][seeds])
        airway = np.isin(comp, ids[ids > 0])
        if np.count_nonzero(airway) * voxel_ml <= AIRWAY_MAX_ML:
            rim_steps = max(1, int(round(AIRWAY_RIM_MM / min(spacing[1:]))))
            return ndimage.binary_dilation(airway, _SLICE_STRUCTURE_8, iterations=rim_steps, mask=inside_air)
    return none


def _lung_components(
    mask: np.ndarray, spacing: tuple[float, float, float]
) -> list[tuple[tuple[slice, ...], np.ndarray]]:
    """The largest air component and any other big one reaching its upper half (the other lung)."""
    comp, n = ndimage.label(mask)
    if n == 0:
        raise SegmentationError("no air-filled region left after removing the airways: no lungs found")
    sizes = np.bincount(comp.ravel())[1:]
    boxes = ndimage.find_objects(comp)
    largest = int(np.argmax(sizes))
    z0, z1 = boxes[largest][0].start, boxes[largest][0].stop
    upper_half = z0 + (z1 - z0) / 2
    out = []
    for i in np.argsort(sizes)[::-1]:
        if i != largest and (sizes[i] < SECOND_LUNG_MIN_SHARE * sizes[largest] or boxes[i][0].stop <= upper_half):
            continue
        box = _pad_box(boxes[i], mask.shape, spacing, CLOSING_RADIUS_MM)
        out.append((box, comp[box] == i + 1))
    return out


def _pad_box(
    box: tuple[slice, ...], shape: tuple[int, ...], spacing: tuple[float, float, float], mm: float
) -> tuple[slice, ...]:
    pads = [int(np.ceil(mm / sp)) + 1 for sp in spacing]
    return tuple(slice(max(0, s.start - p), min(n, s.stop + p)) for s, n, p in zip(box, shape, pads, strict=True))


def _closing(mask: np.ndarray, spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """Morphological closing with a ball of ``radius_mm`` (exact, via distance transforms)."""
    pad = [int(np.ceil(radius_mm / s)) + 1 for s in spacing]
    padded = np.pad(mask, [(p, p) for p in pad])
    dilated = ndimage.distance_transform_edt(~padded, sampling=spacing) <= radius_mm
    closed = ndimage.distance_transform_edt(dilated, sampling=spacing) > radius_mm
    result: np.ndarray = closed[pad[0] : -pad[0], pad[1] : -pad[1], pad[2] : -pad[2]] | mask
    return result


# --- splitting steps ------------------------------------------------------------------------


def _mean_axis2(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[2].mean())


def _split_by_erosion(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray | None:
    """Seeds (1 right, 2 left) from the first erosion depth that leaves two big cores side by side."""
    depth = ndimage.distance_transform_edt(mask, sampling=spacing)
    for mm in SPLIT_EROSION_MM:
        core = depth > mm
        comp, n = ndimage.label(core)
        if n < 2:
            if n == 0:
                return None
            continue
        sizes = np.bincount(comp.ravel())[1:]
        a, b = np.argsort(sizes)[::-1][:2] + 1
        if sizes[b - 1] < SPLIT_MIN_SHARE * (sizes[a - 1] + sizes[b - 1]):
            continue
        right, left = sorted((a, b), key=lambda c: _mean_axis2(comp == c))
        seeds = np.zeros(mask.shape, dtype=np.uint8)
        seeds[comp == right] = RIGHT_LUNG
        seeds[comp == left] = LEFT_LUNG
        return seeds
    return None


def _grow(seeds: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Give every mask voxel the label of its nearest seed voxel (within the mask's bounding box)."""
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    crop = seeds[box]
    nearest = ndimage.distance_transform_edt(crop == 0, sampling=spacing, return_distances=False, return_indices=True)
    grown = crop[tuple(nearest)]
    del nearest
    labels = np.zeros(seeds.shape, dtype=np.uint8)
    labels[box] = np.where(mask[box], grown, 0)
    return labels


def _assign_rest(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Give mask voxels not reached from the seeds (small pieces) the side of the nearer lung."""
    rest = mask & (labels == 0)
    if rest.any():
        right_x = _mean_axis2(labels == RIGHT_LUNG)
        left_x = _mean_axis2(labels == LEFT_LUNG)
        comp, n = ndimage.label(rest)
        centres = ndimage.center_of_mass(rest, comp, range(1, n + 1))
        lookup = np.zeros(n + 1, dtype=np.uint8)
        for i, c in enumerate(centres, start=1):
            lookup[i] = RIGHT_LUNG if abs(c[2] - right_x) <= abs(c[2] - left_x) else LEFT_LUNG
        labels = labels.copy()
        labels[rest] = lookup[comp[rest]]
    return labels


def _split_by_valley(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Split each slice at the mediastinal valley of the left-right profile, near the global one."""
    labels = np.zeros(mask.shape, dtype=np.uint8)
    profile = mask.sum(axis=(0, 1)).astype(float)
    cols = np.arange(mask.shape[2])
    nz = np.flatnonzero(profile)
    lo, hi = int(nz[0]), int(nz[-1])
    inner = slice(lo + (hi - lo) // 4, hi - (hi - lo) // 4 + 1)
    valley = inner.start + int(np.argmin(profile[inner]))
    peaks = min(profile[lo:valley].max(initial=0), profile[valley + 1 : hi + 1].max(initial=0))
    ratio = profile[valley] / max(1.0, peaks)
    if ratio > VALLEY_MAX_RATIO:  # one lung: its side is where its centre lies in the image
        side = LEFT_LUNG if np.average(cols, weights=profile) >= (mask.shape[2] - 1) / 2 else RIGHT_LUNG
        labels[mask] = side
        return labels
    window = max(1, int(round(30.0 / spacing[2])))
    for k in range(mask.shape[0]):
        sl = mask[k]
        if not sl.any():
            continue
        p = sl.sum(axis=0)
        a, b = max(0, valley - window), min(mask.shape[2], valley + window + 1)
        lowest = np.flatnonzero(p[a:b] == p[a:b].min())
        split = a + int(lowest[lowest.size // 2])  # middle of a flat valley
        labels[k][sl & (cols[None, :] < split)] = RIGHT_LUNG
        labels[k][sl & (cols[None, :] >= split)] = LEFT_LUNG
    return labels


# --- where the lungs meet the mediastinum ---------------------------------------------------


def mediastinum(lung_labels: np.ndarray) -> np.ndarray:
    """Per row of each slice, what lies between the right lung's medial end and the left lung's
    medial start: the mediastinum, the heart and the spine, never lung."""
    cols = np.arange(lung_labels.shape[2])
    right_end = np.where(lung_labels == RIGHT_LUNG, cols, -1).max(axis=2)
    left_start = np.where(lung_labels == LEFT_LUNG, cols, lung_labels.shape[2]).min(axis=2)
    gap = (right_end >= 0) & (left_start < lung_labels.shape[2]) & (right_end < left_start)
    between: np.ndarray = gap[..., None] & (cols > right_end[..., None]) & (cols < left_start[..., None])
    return between


def distance_to_mediastinum(lung_labels: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """In-plane distance (mm) of every voxel to :func:`mediastinum`; infinite in slices without one."""
    between = mediastinum(lung_labels)
    out = np.full(lung_labels.shape, np.inf, dtype=np.float32)
    for k in np.flatnonzero(between.any(axis=(1, 2))):
        out[k] = ndimage.distance_transform_edt(~between[k], sampling=spacing[1:])
    return out
