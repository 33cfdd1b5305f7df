"""Bright tubular structures in lung CT (vessels, airway walls): multi-scale Hessian ridges.

Threshold lesion methods paint vessels as lesions, because a vessel is as dense as
consolidation. What tells them apart is shape: in an axial slice a vessel is a bright line
(running in-plane) or a small bright dot (crossing the slice), while ground glass and
consolidation are broad patches. The Hessian of the slice smoothed at scale sigma has, at a
bright line of width about 2 sigma, one strongly negative eigenvalue across the line and one
near zero along it; at a bright dot both are negative. A broad patch has a flat interior
(eigenvalues near zero) and bends only at its rim.

The analysis is per axial slice (2D) with sigma in millimetres: it is the same on 1 mm and
5 mm slices (a 3D Hessian cannot see a vessel running within a 5 mm slice), and on volumes
made of one slice repeated. It is Frangi's idea (Frangi et al. 1998) reduced to what separates
vessels from lesions: ridge strength sigma^2 * |lambda_2| (scale-normalised, so a line scores
its contrast whatever its width) and line-versus-blob (|lambda_2| against |lambda_1|).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Scales (Gaussian sigma, mm): vessels of about 2 to 17 mm across (segmental to lobar vessels
#: inside the lung mask; the main pulmonary arteries lie in the mediastinum, outside it).
SCALES_MM = (1.0, 1.5, 2.0, 3.0, 4.5, 6.0)
#: Ridge strength (HU, scale-normalised) above which a line or dot is a vessel or an airway
#: wall. A vessel stands 700-900 HU above aerated lung and scores about a third of that;
#: ground glass stands 200-350 HU above it and scores below this.
RIDGE_MIN_HU = 150.0
#: Up to this scale a round bright dot is a vessel crossing the slice (or a nodule of a few
#: millimetres); above it only elongated structures count, so that round patches of ground
#: glass or consolidation stay lesions.
DOT_MAX_SCALE_MM = 2.0
#: What the image reads as outside the region: aerated lung.
OUTSIDE_HU = -850.0
#: Elongated: the across-line curvature is at least this many times the along-line one.
LINE_MIN_ANISOTROPY = 2.0


def vessel_mask(hu: np.ndarray, region: np.ndarray, spacing: tuple[float, float, float],
                central: np.ndarray | None = None) -> np.ndarray:
    """Voxels of ``region`` on bright lines or small bright dots of any of SCALES_MM.

    ``hu`` is a (z, y, x) volume, ``spacing`` its voxel size in mm; only axes 1 and 2 are used.
    Lines wider than DOT_MAX_SCALE_MM count only within ``central`` (default: everywhere): vessels
    taper towards the pleura, so a wide bright band out there is a consolidation, not a vessel.
    """
    out = np.zeros(hu.shape, dtype=bool)
    boxes = ndimage.find_objects(region.astype(np.uint8))
    if not boxes or boxes[0] is None:
        return out
    margin = [0] + [int(np.ceil(3 * max(SCALES_MM) / s)) for s in spacing[1:]]
    box = tuple(slice(max(0, b.start - m), min(n, b.stop + m))
                for b, m, n in zip(boxes[0], margin, hu.shape, strict=True))
    # Outside the region (chest wall, mediastinum) reads as aerated lung: dense lung against the
    # chest wall is then a patch, not the bright flank of a wall that looks like a line.
    image = np.where(region[box], hu[box], np.float32(OUTSIDE_HU)).astype(np.float32, copy=False)
    found = out[box]
    for sigma_mm in SCALES_MM:
        sigma = (0.0, sigma_mm / spacing[1], sigma_mm / spacing[2])
        norm = np.float32(sigma[1] * sigma[2])  # sigma^2 in pixels: scale-normalised curvature
        hyy = ndimage.gaussian_filter(image, sigma, order=(0, 2, 0), mode="nearest") * norm
        hxx = ndimage.gaussian_filter(image, sigma, order=(0, 0, 2), mode="nearest") * norm
        hxy = ndimage.gaussian_filter(image, sigma, order=(0, 1, 1), mode="nearest") * norm
        half_trace = (hxx + hyy) / 2
        root = np.sqrt(((hxx - hyy) / 2) ** 2 + hxy**2)
        del hxx, hyy, hxy
        across = half_trace - root  # the more negative eigenvalue: curvature across a bright line
        along = half_trace + root
        del half_trace, root
        ridge = across < -RIDGE_MIN_HU
        if sigma_mm > DOT_MAX_SCALE_MM:
            ridge &= -across >= LINE_MIN_ANISOTROPY * np.abs(along)
            if central is not None:
                ridge &= central[box]
        found |= ridge
        del across, along, ridge
    out &= region
    return out


#: Wide vessels (lobar and segmental, wider than DOT_MAX_SCALE_MM lines) lie within this distance
#: of the mediastinum; the outer lung holds vessels of a few millimetres.
CENTRAL_ZONE_MM = 60.0
#: Near the hila vessels are wide and branch (a branching point is round, not a line): there,
#: dense structures connected to detected vessels are the bronchovascular tree too.
HILAR_ZONE_MM = 25.0
#: How far beyond a detected vessel line a dense hilar voxel still belongs to it (half the width
#: of a lobar vessel or bronchus around its detected core).
TREE_REACH_MM = 5.0
#: Blood and vessel walls without contrast (about 40 HU) blurred by partial volume.
VESSEL_CORE_MIN_HU = -400.0


def bronchovascular_tree(smooth: np.ndarray, lung_labels: np.ndarray, vessels: np.ndarray,
                         to_mediastinum_mm: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """``vessels`` plus dense lung (>= VESSEL_CORE_MIN_HU) within HILAR_ZONE_MM of the mediastinum
    and within TREE_REACH_MM (in-plane) of them: the central vessels and bronchi where they are
    too wide and too branched to look like lines. A consolidation by the hilum reaches further
    and stays a lesion. ``smooth`` is the HU volume after noise smoothing, ``to_mediastinum_mm``
    :func:`models.lungs_threshold.distance_to_mediastinum`."""
    hilar = (lung_labels > 0) & (to_mediastinum_mm <= HILAR_ZONE_MM)
    seeds = vessels & hilar
    out = vessels.copy()
    for k in np.flatnonzero(seeds.any(axis=(1, 2))):
        near = ndimage.distance_transform_edt(~seeds[k], sampling=spacing[1:]) <= TREE_REACH_MM
        out[k] |= near & hilar[k] & (smooth[k] >= VESSEL_CORE_MIN_HU)
    return out
