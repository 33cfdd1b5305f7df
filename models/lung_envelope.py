"""Give the lungs back the dense lung that a threshold leaves out, and set pleural fluid apart.

A threshold lung mask holds aerated lung only: consolidation, dense atelectasis and pleura-based
opacities against the chest wall are soft-tissue dense and fall outside it, so a sick lung looks
small and its severity low. Along the chest wall, such lung is a dent in the aerated lung's
outline. In each slice, each lung's convex hull spans its dents; a dent whose mouth (where the
hull leaves the lung) is at most DENT_MOUTH_MAX_MM wide is lung given back, in numerator and
denominator alike. The heart's and the diaphragm's indentations open far wider and stay out.
Nothing is taken from the mediastinum (what lies between the two lungs in each row), from bone
or from the other lung, nor within the hilar zone (``models.vesselness.HILAR_ZONE_MM``), where
the dents are bronchi, vessels and nodes.

Pleural effusion is not lung. A bridged region that is homogeneous fluid (0-20 HU after
smoothing, little spread, no aerated bronchi) and lies in the dependent half of the lung is
left out and reported; when it cannot be told apart, the caller flags the result instead
(``models.findings``). Wider losses (a hemithorax mostly white) are beyond a rolling ball: they
show as one lung much smaller than the other and are flagged, not guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from models.lungs_threshold import IN_PLANE_STRUCTURE, LEFT_LUNG, RIGHT_LUNG, distance_to_mediastinum, mediastinum
from models.preprocessing import smooth_inplane
from models.vesselness import HILAR_ZONE_MM

#: Widest mouth of a dent given back (subpleural consolidation, plate atelectasis, a dense
#: segment against the chest wall); the heart's and the diaphragm's indentations are wider.
DENT_MOUTH_MAX_MM = 45.0
#: Bone (ribs, vertebrae) and contrast-filled vessels are denser than any lung: never added.
ADDED_MAX_HU = 150.0
#: Bridged regions smaller than this are partial-volume slivers, not worth a decision.
MIN_REGION_ML = 1.0
#: Pleural fluid: smoothed median in this range, spread below FLUID_MAX_SPREAD_HU, almost no
#: aerated voxels (air bronchograms mark consolidated lung), mostly in the dependent half.
FLUID_HU = (-10.0, 30.0)
FLUID_MAX_SPREAD_HU = 30.0
FLUID_MAX_AERATED_SHARE = 0.02
AERATED_HU = -500.0


@dataclass(frozen=True)
class EnvelopeResult:
    """Lung labels with the dense lung given back, and what was added and set apart (mL per side)."""

    lung_labels: np.ndarray
    added_ml: dict[str, float]
    fluid_ml: dict[str, float]


def pleural_envelope(hu: np.ndarray, lung_labels: np.ndarray, spacing: tuple[float, float, float]) -> EnvelopeResult:
    """Add to each lung the dense dents along its pleura (see the module docstring)."""
    labels = lung_labels.copy()
    smooth = smooth_inplane(hu, spacing)
    blocked = (mediastinum(lung_labels) | (distance_to_mediastinum(lung_labels, spacing) < HILAR_ZONE_MM)
               | (smooth > ADDED_MAX_HU) | (lung_labels > 0))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    added_ml, fluid_ml = {}, {}
    for side, name in ((RIGHT_LUNG, "right"), (LEFT_LUNG, "left")):
        lung = lung_labels == side
        bridged = np.zeros(lung.shape, dtype=bool)
        for k in np.flatnonzero(lung.any(axis=(1, 2))):
            bridged[k] = _dents(lung[k], spacing[1:]) & ~blocked[k] & (labels[k] == 0)
        comp, n = ndimage.label(bridged, structure=ndimage.generate_binary_structure(3, 3))
        added = fluid = 0.0
        dependent_row = _dependent_half_start(lung)
        for i, region in enumerate(ndimage.find_objects(comp), start=1):
            mask = comp[region] == i
            ml = float(np.count_nonzero(mask)) * voxel_ml
            if ml < MIN_REGION_ML:
                continue
            interior = ndimage.binary_erosion(mask, IN_PLANE_STRUCTURE)
            judged = interior if interior.any() else mask  # the rim mixes with the lung beside it
            rows = np.nonzero(mask)[1] + region[1].start
            if _looks_like_fluid(smooth[region][judged], hu[region][judged], rows, dependent_row):
                fluid += ml
                continue
            labels[region][mask] = side
            added += ml
        added_ml[name], fluid_ml[name] = round(added, 1), round(fluid, 1)
    return EnvelopeResult(labels, added_ml, fluid_ml)


def _dents(lung: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Pixels of the lung's convex hull (one slice) in dents whose mouth is narrow enough."""
    hull = _convex_hull(lung)
    edge = hull & ~ndimage.binary_erosion(hull)
    comp, n = ndimage.label(hull & ~lung, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return np.zeros(lung.shape, dtype=bool)
    mouth_mm = np.bincount(comp[edge], minlength=n + 1) * float(np.mean(spacing))
    keep = mouth_mm <= DENT_MOUTH_MAX_MM
    keep[0] = False
    return keep[comp]


def _convex_hull(mask: np.ndarray) -> np.ndarray:
    """The convex hull of a 2D mask's pixel centres, as a mask (the mask itself when degenerate)."""
    points = np.argwhere(mask)
    if len(points) < 3:
        return mask.copy()
    try:
        hull = ConvexHull(points)
    except QhullError:  # all pixels on one line
        return mask.copy()
    (r0, c0), (r1, c1) = points.min(axis=0), points.max(axis=0) + 1
    rows, cols = np.mgrid[r0:r1, c0:c1]
    inside = np.ones(rows.shape, dtype=bool)
    for a, b, offset in hull.equations:  # a * row + b * col + offset <= 0 inside
        inside &= a * rows + b * cols + offset <= 1e-6
    out = np.zeros(mask.shape, dtype=bool)
    out[r0:r1, c0:c1] = inside
    filled: np.ndarray = out | mask
    return filled


def _dependent_half_start(lung: np.ndarray) -> int:
    """First row of the posterior (dependent, supine) half of the lung."""
    rows = np.flatnonzero(lung.any(axis=(0, 2)))
    return int((rows[0] + rows[-1]) // 2)


def _looks_like_fluid(smooth: np.ndarray, raw: np.ndarray, rows: np.ndarray, dependent_row: int) -> bool:
    """Homogeneous fluid density, no aerated bronchi, mostly dependent. Density is judged on the
    region's interior (``smooth`` and ``raw`` hold the interior first; see the caller)."""
    median = float(np.median(smooth))
    spread = float(np.percentile(smooth, 84) - np.percentile(smooth, 16)) / 2
    aerated = float(np.mean(raw < AERATED_HU))
    return (FLUID_HU[0] <= median <= FLUID_HU[1] and spread <= FLUID_MAX_SPREAD_HU
            and aerated <= FLUID_MAX_AERATED_SHARE and float(np.mean(rows >= dependent_row)) >= 0.5)
