"""The paper's per-slice preprocessing: 2x2 mm in-plane resampling and a fixed HU window.

Goncharov et al. (2021, section 4.1) rescale every axial slice to 2x2 mm pixels and map
intensities to [0, 1]. Doing the same here keeps thresholds in millimetres comparable across
scanners and gives networks the input they were trained on.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: The paper's in-plane pixel spacing (mm).
PAPER_INPLANE_SPACING_MM = (2.0, 2.0)
#: HU window mapped to [0, 1]: from air to just above soft tissue, which keeps lung, lesions
#: and mediastinum apart and saturates bone (irrelevant to lung findings).
WINDOW_HU = (-1000.0, 300.0)


def resample_inplane(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    target: tuple[float, float] = PAPER_INPLANE_SPACING_MM,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Resample axes 1 and 2 of a (z, y, x) volume to ``target`` mm (linear; z untouched).

    The output keeps the field of view: the new size is the old extent divided by the target,
    rounded, and the returned spacing is the exact one of that grid (extent / new size).
    """
    if hu.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {hu.shape}")
    sizes = [max(1, round(hu.shape[a] * spacing[a] / target[a - 1])) for a in (1, 2)]
    zoom = (1.0, sizes[0] / hu.shape[1], sizes[1] / hu.shape[2])
    new_spacing = (float(spacing[0]), spacing[1] * hu.shape[1] / sizes[0], spacing[2] * hu.shape[2] / sizes[1])
    if zoom[1] == 1.0 and zoom[2] == 1.0:
        return hu.astype(np.float32, copy=False), new_spacing
    out = np.empty((hu.shape[0], sizes[0], sizes[1]), dtype=np.float32)
    for k in range(hu.shape[0]):  # slice by slice: no z interpolation and bounded temporaries
        ndimage.zoom(hu[k], zoom[1:], output=out[k], order=1, mode="nearest", grid_mode=True)
    return out, new_spacing


#: In-plane smoothing before densities are judged: a sharp lung kernel has about twice the noise
#: of a standard one, and unsmoothed noise crosses thresholds.
NOISE_SIGMA_MM = 1.5


def smooth_inplane(hu: np.ndarray, spacing: tuple[float, float, float], sigma_mm: float = NOISE_SIGMA_MM) -> np.ndarray:
    """Gaussian smoothing within each axial slice (``sigma_mm``), float32; slices are not mixed."""
    sigma = (0.0, sigma_mm / spacing[1], sigma_mm / spacing[2])
    return ndimage.gaussian_filter(hu.astype(np.float32, copy=False), sigma)


def window(hu: np.ndarray, low: float = WINDOW_HU[0], high: float = WINDOW_HU[1]) -> np.ndarray:
    """Map HU linearly from [low, high] to [0, 1] (clipped), as float32."""
    if high <= low:
        raise ValueError("window needs high > low")
    out = (np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(out, 0.0, 1.0, out=out)
