"""Pictures of a scored study: an axial slice and an X-ray-like projection with lesions overlaid
(the idea of Goncharov et al. 2021, Figure 1). Pure functions: canonical (z, y, x) arrays in,
RGB uint8 arrays out, in radiological display convention (patient's right on the image's left,
anterior or superior at the top).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Lung window for the axial slice (level -600, width 1500).
LUNG_WINDOW_HU = (-1350.0, 150.0)
LESION_RGB = np.array([255, 80, 40], dtype=np.float32)
LUNG_EDGE_RGB = np.array([80, 200, 255], dtype=np.float32)


def _gray(image: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = np.clip((image.astype(np.float32) - low) / (high - low), 0.0, 1.0) * 255.0
    return np.repeat(scaled[..., None], 3, axis=-1)


def _blend(rgb: np.ndarray, mask_or_alpha: np.ndarray, color: np.ndarray, strength: float) -> np.ndarray:
    alpha = np.clip(mask_or_alpha.astype(np.float32), 0.0, 1.0)[..., None] * strength
    blended: np.ndarray = rgb * (1.0 - alpha) + color * alpha
    return blended


def _square_pixels(rgb: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    """Stretch rows so that a pixel is as tall as it is wide (slices are often thicker)."""
    if abs(row_mm - col_mm) < 1e-3:
        return rgb
    return ndimage.zoom(rgb, (row_mm / col_mm, 1.0, 1.0), order=1)


def most_affected_slice(lung_labels: np.ndarray, lesions: np.ndarray) -> int:
    """The slice with the most lesion voxels, else the one with the most lung."""
    per_slice = lesions.reshape(lesions.shape[0], -1).sum(axis=1)
    if per_slice.max() == 0:
        per_slice = (lung_labels > 0).reshape(lung_labels.shape[0], -1).sum(axis=1)
    return int(np.argmax(per_slice))


def axial_overlay(hu: np.ndarray, lung_labels: np.ndarray, lesions: np.ndarray,
                  spacing: tuple[float, float, float], index: int | None = None) -> np.ndarray:
    """The most affected axial slice in the lung window, lung borders and lesions coloured."""
    k = most_affected_slice(lung_labels, lesions) if index is None else index
    rgb = _gray(hu[k], *LUNG_WINDOW_HU)
    lungs = lung_labels[k] > 0
    edge = lungs & ~ndimage.binary_erosion(lungs, iterations=1)
    rgb = _blend(rgb, edge, LUNG_EDGE_RGB, 0.9)
    rgb = _blend(rgb, lesions[k], LESION_RGB, 0.55)
    return _square_pixels(rgb, spacing[1], spacing[2]).astype(np.uint8)


def projection_overlay(hu: np.ndarray, lung_labels: np.ndarray, lesions: np.ndarray,
                       spacing: tuple[float, float, float]) -> np.ndarray:
    """A frontal (coronal) projection like a chest X-ray, with the share of lesion along each
    ray in colour: where the lesions are and how deep, at one glance."""
    attenuation = np.clip(hu.astype(np.float32) + 1000.0, 0.0, None) / 1000.0
    radiograph = attenuation.mean(axis=1)[::-1]  # superior at the top
    lo, hi = np.percentile(radiograph, [1.0, 99.5])
    rgb = _gray(radiograph, float(lo), float(max(hi, lo + 1e-3)))
    lung_depth = (lung_labels > 0).sum(axis=1)[::-1].astype(np.float32)
    lesion_depth = lesions.sum(axis=1)[::-1].astype(np.float32)
    share = np.divide(lesion_depth, lung_depth, out=np.zeros_like(lesion_depth), where=lung_depth > 0)
    rgb = _blend(rgb, np.sqrt(share), LESION_RGB, 0.8)
    return _square_pixels(rgb, spacing[0], spacing[2]).astype(np.uint8)
