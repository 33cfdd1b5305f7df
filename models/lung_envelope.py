"""Give the lungs back the dense lung that a threshold leaves out, and set pleural fluid apart.

A threshold lung mask holds aerated lung only: consolidation, dense atelectasis and pleura-based
opacities against the chest wall are soft-tissue dense and fall outside it, so a sick lung looks
small and its severity low. Along the chest wall, such lung is a dent in the aerated lung's
outline; a ball rolled along the pleura (a per-slice closing of each lung) bridges dents up to
about twice its radius wide and gives them back, in numerator and denominator alike. Nothing is
taken from the mediastinum (what lies between the two lungs in each row), from bone or from the
other lung, nor within the hilar zone (``models.vesselness.HILAR_ZONE_MM``), where the dents
are bronchi, vessels and nodes.

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

from models.lungs_threshold import LEFT_LUNG, RIGHT_LUNG, distance_to_mediastinum, mediastinum
from models.vesselness import HILAR_ZONE_MM

#: Radius of the ball rolled along the pleura: dents up to about 20 mm wide are given back
#: (subpleural consolidation, plate atelectasis); the heart's and the diaphragm's indentations
#: are far wider and stay out.
PLEURAL_BALL_MM = 10.0
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
    smooth = ndimage.gaussian_filter(hu.astype(np.float32, copy=False), (0.0, 1.5 / spacing[1], 1.5 / spacing[2]))
    blocked = (mediastinum(lung_labels) | (distance_to_mediastinum(lung_labels, spacing) < HILAR_ZONE_MM)
               | (smooth > ADDED_MAX_HU) | (lung_labels > 0))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    added_ml, fluid_ml = {}, {}
    for side, name in ((RIGHT_LUNG, "right"), (LEFT_LUNG, "left")):
        lung = lung_labels == side
        bridged = np.zeros(lung.shape, dtype=bool)
        for k in np.flatnonzero(lung.any(axis=(1, 2))):
            bridged[k] = _closing_2d(lung[k], spacing[1:], PLEURAL_BALL_MM) & ~blocked[k]
        comp, n = ndimage.label(bridged, structure=ndimage.generate_binary_structure(3, 3))
        added = fluid = 0.0
        dependent_row = _dependent_half_start(lung)
        for i, region in enumerate(ndimage.find_objects(comp), start=1):
            mask = comp[region] == i
            ml = float(np.count_nonzero(mask)) * voxel_ml
            if ml < MIN_REGION_ML:
                continue
            values = smooth[region][mask]
            rows = np.nonzero(mask)[1] + region[1].start
            if _looks_like_fluid(values, hu[region][mask], rows, dependent_row):
                fluid += ml
                continue
            labels[region][mask] = side
            added += ml
        added_ml[name], fluid_ml[name] = round(added, 1), round(fluid, 1)
    return EnvelopeResult(labels, added_ml, fluid_ml)


def _closing_2d(mask: np.ndarray, spacing: tuple[float, ...], radius_mm: float) -> np.ndarray:
    """Exact closing of one slice with a disc of ``radius_mm``, via distance transforms."""
    pad = [int(np.ceil(radius_mm / s)) + 1 for s in spacing]
    padded = np.pad(mask, [(p, p) for p in pad])
    dilated = ndimage.distance_transform_edt(~padded, sampling=spacing) <= radius_mm
    closed = ndimage.distance_transform_edt(dilated, sampling=spacing) > radius_mm
    return closed[pad[0]:-pad[0], pad[1]:-pad[1]] & ~mask


def _dependent_half_start(lung: np.ndarray) -> int:
    """First row of the posterior (dependent, supine) half of the lung."""
    rows = np.flatnonzero(lung.any(axis=(0, 2)))
    return int((rows[0] + rows[-1]) // 2)


def _looks_like_fluid(smooth: np.ndarray, raw: np.ndarray, rows: np.ndarray, dependent_row: int) -> bool:
    median = float(np.median(smooth))
    spread = float(np.percentile(smooth, 84) - np.percentile(smooth, 16)) / 2
    aerated = float(np.mean(raw < AERATED_HU))
    return (FLUID_HU[0] <= median <= FLUID_HU[1] and spread <= FLUID_MAX_SPREAD_HU
            and aerated <= FLUID_MAX_AERATED_SHARE and float(np.mean(rows >= dependent_row)) >= 0.5)
