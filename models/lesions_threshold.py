"""Weight-free lesion segmentation for real chest CT: density above the lung's own baseline,
vessels set aside, a majority vote, small components dropped.

Goncharov et al. (2021, section 2.2) threshold an absolute HU band, blur the binary mask and
re-threshold at 0.5 (kept here as :func:`segment_lesions_paper`). On real CT that counts the
hilar and central vessels and the gravity-dependent lung (100-150 HU denser posteriorly in a
supine patient) as lesions, and a sharp kernel's noise moves the score. :func:`segment_lesions`
keeps the paper's idea (dense, not thin, not tiny) and judges density against a baseline fitted
to the lung itself, with vessels and the pleural shell voted on instead of counted. It still
cannot tell COVID-19 lesions from other dense findings (nodules, masses, atelectasis): that is
the networks' job.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from models.lungs_threshold import IN_PLANE_STRUCTURE, distance_to_mediastinum
from models.preprocessing import NOISE_SIGMA_MM, smooth_inplane
from models.vesselness import CENTRAL_ZONE_MM, bronchovascular_tree, vessel_mask


@dataclass(frozen=True)
class LesionThresholdParams:
    """Parameters of :func:`segment_lesions_paper`."""

    hu_min: float
    hu_max: float
    sigma_mm: float
    min_component_fraction: float  # of the lung volume


#: The paper's grid-searched values: HU in [-700, 300], sigma = 4, Vmin = 0.1 % of the lungs.
#: (The journal text lost the minus signs, "HUmin=700, HUmax=300"; both preprints give -700 and
#: +300.) The paper does not state sigma's unit; on its 2x2 mm slices, 4 voxels is 8 mm.
PAPER_BASELINE = LesionThresholdParams(hu_min=-700.0, hu_max=300.0, sigma_mm=8.0, min_component_fraction=0.001)

#: The lesion step of the method's first version (threshold-1.0): an absolute band of -750..100
#: HU, a 3 mm blur re-thresholded at 0.5. Kept to measure what threshold-2.0 changed on real CT.
VERSION_1_PARAMS = LesionThresholdParams(hu_min=-750.0, hu_max=100.0, sigma_mm=3.0, min_component_fraction=0.001)


@dataclass(frozen=True)
class LesionParams:
    """Parameters of :func:`segment_lesions` (defaults: ``DEFAULT_LESION_PARAMS``)."""

    #: In-plane Gaussian smoothing before any density is judged (``models.preprocessing``).
    noise_sigma_mm: float = NOISE_SIGMA_MM
    #: A lesion is at least this much denser than the lung's own baseline at that height.
    rise_min_hu: float = 185.0
    #: ... and at least this dense in absolute terms (aerated lung is never a lesion).
    floor_hu: float = -750.0
    #: Denser than this is contrast-filled vessel, calcification or bone, not a lesion.
    hu_max: float = 100.0
    #: The majority vote's neighbourhood (Gaussian sigma): thinner leftovers are not lesions.
    vote_sigma_mm: float = 3.0
    #: How far (voxels, in-plane) a lesion's margin is judged on its own unsmoothed density.
    margin_voxels: int = 1
    #: Components smaller than this share of the lungs are dropped (the paper's Vmin).
    min_component_fraction: float = 0.001
    #: Steepest gravity gradient of the baseline, HU per cm of height (normal supine lungs:
    #: 2-6 HU/cm in inspiration, more in expiration).
    gradient_max_hu_per_cm: float = 5.0
    #: The baseline at the lung's least dependent height is at most this (normal aerated lung is
    #: -950..-800 HU there): a lung full of ground glass cannot make ground glass its baseline.
    level_max_hu: float = -850.0


DEFAULT_LESION_PARAMS = LesionParams()
#: Height bins (mm along the anterior-posterior axis) of the baseline fit.
BASELINE_BIN_MM = 8.0
#: The baseline of a height bin is this percentile of its parenchyma: lesions may fill up to
#: three quarters of a bin before they lift it.
BASELINE_PERCENTILE = 25.0
BASELINE_MIN_VOXELS = 50
#: Depth of the pleural shell that takes the vote of the lung beneath it (see ``_rim``).
PLEURAL_RIM_MM = 4.5


def segment_lesions(
    hu: np.ndarray,
    lung_labels: np.ndarray,
    spacing: tuple[float, float, float],
    params: LesionParams = DEFAULT_LESION_PARAMS,
) -> np.ndarray:
    """Boolean lesion mask inside the lungs: denser than the lung's own baseline, not a vessel.

    ``lung_labels``: 0 outside, one label per lung (a boolean mask is one lung). Steps:

    1. smooth in-plane (``noise_sigma_mm``) so that kernels agree;
    2. vessels and airway walls set aside: thin ones as bright lines and small dots
       (:func:`models.vesselness.vessel_mask`), central ones as the dense tree connected to them
       near the hila (:func:`models.vesselness.bronchovascular_tree`);
    3. the parenchyma baseline as a function of height (axis 1), fitted to both lungs' own voxels
       with a bounded gravity gradient and a capped level: dependent lung is judged against
       dependent lung, and diffuse ground glass cannot become the baseline;
    4. candidates: at least ``rise_min_hu`` above the baseline, between ``floor_hu`` and ``hu_max``;
    5. a majority vote (Gaussian ``vote_sigma_mm``) over the lung without its vessels and pleural
       shell: every lung voxel but the central tree takes the side of most of its parenchymal
       neighbourhood, so thin leftovers and a thin band of dependent lung under the pleura are
       not lesions, while the shell under a subpleural lesion and a small vessel crossing ground
       glass are (as a reader outlines a lesion); the central vessels and bronchi never are;
    6. components smaller than ``min_component_fraction`` of the lungs are dropped.
    """
    _check_shapes(hu, lung_labels)
    lungs = lung_labels > 0
    if not lungs.any():
        return np.zeros(hu.shape, dtype=bool)
    smooth = smooth_inplane(hu, spacing, params.noise_sigma_mm)
    to_mediastinum = distance_to_mediastinum(lung_labels, spacing)
    thin = vessel_mask(hu, lungs, spacing, central=to_mediastinum <= CENTRAL_ZONE_MM)
    central = bronchovascular_tree(smooth, lung_labels, thin, to_mediastinum, spacing) & ~thin
    del to_mediastinum
    parenchyma = lungs & ~thin & ~central & ~_rim(lungs, spacing)
    baseline = parenchyma_baseline(smooth, parenchyma, spacing[1], params)
    threshold = np.maximum(baseline + params.rise_min_hu, params.floor_hu)[None, :, None]
    candidates = parenchyma & (smooth >= threshold) & (smooth <= params.hu_max)
    sigma = [params.vote_sigma_mm / s for s in spacing]
    votes = ndimage.gaussian_filter(candidates.astype(np.float32), sigma, mode="constant")
    weight = ndimage.gaussian_filter(parenchyma.astype(np.float32), sigma, mode="constant")
    lesions = lungs & ~central & (votes > 0.5 * weight) & (weight > 0)
    # The margin: smoothing blends a lesion's outermost voxel with the lung beside it and the vote
    # leaves it out; it is lesion where its own density (unsmoothed) is above the rise.
    margin = lungs & ~central & (hu >= threshold) & (hu <= params.hu_max)
    lesions |= margin & ndimage.binary_dilation(lesions, IN_PLANE_STRUCTURE, iterations=params.margin_voxels)
    return _drop_small(lesions, params.min_component_fraction * np.count_nonzero(lungs))


def parenchyma_baseline(smooth: np.ndarray, parenchyma: np.ndarray, row_mm: float,
                        params: LesionParams = DEFAULT_LESION_PARAMS) -> np.ndarray:
    """Expected HU of normal lung per row (axis 1): a line in height fitted to low percentiles.

    Each BASELINE_BIN_MM band of rows gives its BASELINE_PERCENTILE; a line through them (least
    squares, weighted by voxels) has its slope clipped to the gravity gradient a lung can have
    (either sign: prone patients are dependent anteriorly), and is then lowered where needed so
    that its least dependent end is at most ``level_max_hu``.
    """
    rows = smooth.shape[1]
    ys, values = np.nonzero(parenchyma)[1], smooth[parenchyma]
    if ys.size == 0:
        return np.full(rows, params.level_max_hu, dtype=np.float32)
    bin_rows = max(1, int(round(BASELINE_BIN_MM / row_mm)))
    centres, levels, weights = [], [], []
    for start in range(int(ys.min()), int(ys.max()) + 1, bin_rows):
        in_bin = (ys >= start) & (ys < start + bin_rows)
        if np.count_nonzero(in_bin) >= BASELINE_MIN_VOXELS:
            centres.append(float(ys[in_bin].mean()) * row_mm)
            levels.append(float(np.percentile(values[in_bin], BASELINE_PERCENTILE)))
            weights.append(float(np.count_nonzero(in_bin)))
    if not centres:
        level = min(float(np.percentile(values, BASELINE_PERCENTILE)), params.level_max_hu)
        return np.full(rows, level, dtype=np.float32)
    y, q, w = np.asarray(centres), np.asarray(levels), np.asarray(weights)
    slope = 0.0
    if y.size >= 2 and np.ptp(y) > 0:
        ym = np.average(y, weights=w)
        slope = float(np.sum(w * (y - ym) * (q - np.average(q, weights=w))) / np.sum(w * (y - ym) ** 2))
    max_slope = params.gradient_max_hu_per_cm / 10.0
    slope = float(np.clip(slope, -max_slope, max_slope))
    intercept = _weighted_median(q - slope * y, w)
    top = min(y.min(), y.max(), key=lambda v: slope * v)  # the least dependent height
    intercept -= max(0.0, intercept + slope * top - params.level_max_hu)
    level_per_row: np.ndarray = (intercept + slope * np.arange(rows) * row_mm).astype(np.float32)
    return level_per_row


def _rim(lungs: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """The lungs' pleural shell: within PLEURAL_RIM_MM of the border in-plane, or with a face
    neighbour outside the lungs across slices. Partial volume with the chest wall, the mediastinum
    or (through a thick slice) the diaphragm makes it denser than the lung, and a thin band of
    dependent lung lies there; it takes the vote of the lung beneath it."""
    inplane = np.zeros(lungs.shape, dtype=bool)
    for k in np.flatnonzero(lungs.any(axis=(1, 2))):
        inplane[k] = ndimage.distance_transform_edt(lungs[k], sampling=spacing[1:]) <= PLEURAL_RIM_MM
    across = np.zeros(lungs.shape, dtype=bool)
    across[1:] |= ~lungs[:-1]
    across[:-1] |= ~lungs[1:]
    return lungs & (inplane | across)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


def segment_lesions_paper(
    hu: np.ndarray,
    lung_mask: np.ndarray,
    spacing: tuple[float, float, float],
    params: LesionThresholdParams = PAPER_BASELINE,
) -> np.ndarray:
    """The paper's baseline as published: absolute HU band, blur at 0.5, small components removed.

    Kept as the reference the method is measured against; on real CT it counts vessels and
    dependent lung as lesions (see :func:`segment_lesions`).
    """
    _check_shapes(hu, lung_mask)
    lung = lung_mask.astype(bool, copy=False)
    band = lung & (hu >= params.hu_min) & (hu <= params.hu_max)
    if params.sigma_mm > 0:
        blurred = ndimage.gaussian_filter(band.astype(np.float32), sigma=[params.sigma_mm / s for s in spacing],
                                          mode="constant")
        band = (blurred > 0.5) & lung
    return _drop_small(band, params.min_component_fraction * np.count_nonzero(lung))


def _check_shapes(hu: np.ndarray, lung_mask: np.ndarray) -> None:
    if hu.shape != lung_mask.shape:
        raise ValueError(f"HU volume {hu.shape} and lung mask {lung_mask.shape} differ in shape")


def _drop_small(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    """``mask`` without 3D components (26-connected) smaller than ``min_voxels``."""
    comp, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 3))
    if n == 0:
        return mask
    keep = np.bincount(comp.ravel()) >= min_voxels
    keep[0] = False
    return keep[comp]
