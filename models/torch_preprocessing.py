"""The paper's preprocessing (2x2 mm in-plane, HU window to [0, 1]) as torch operations.

Same grid and formulas as :mod:`models.preprocessing` (which the threshold method uses), but it
runs where the tensor lives: on a GPU worker the 512x512 slices are uploaded once as HU and
resampled, windowed and fed to the networks without a round trip through the CPU; on a CPU
worker ``F.interpolate`` is several times faster than ``scipy.ndimage.zoom`` slice by slice.
Bilinear with ``align_corners=False`` samples the same points as ``zoom(grid_mode=True)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.preprocessing import PAPER_INPLANE_SPACING_MM, WINDOW_HU

#: Slices resampled per interpolate call: bounds the float32 temporaries on the device.
RESAMPLE_CHUNK = 64


def resampled_shape(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], target: tuple[float, float]
) -> tuple[tuple[int, int], tuple[float, float, float]]:
    """In-plane size and exact spacing after resampling (as :func:`models.preprocessing.resample_inplane`)."""
    sizes = (max(1, round(shape[1] * spacing[1] / target[0])), max(1, round(shape[2] * spacing[2] / target[1])))
    new_spacing = (float(spacing[0]), spacing[1] * shape[1] / sizes[0], spacing[2] * shape[2] / sizes[1])
    return sizes, new_spacing


def resample_inplane_torch(
    hu: torch.Tensor,
    spacing: tuple[float, float, float],
    target: tuple[float, float] = PAPER_INPLANE_SPACING_MM,
) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """Resample axes 1 and 2 of a (z, y, x) tensor to ``target`` mm, bilinear, as float32."""
    if hu.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {tuple(hu.shape)}")
    sizes, new_spacing = resampled_shape((hu.shape[0], hu.shape[1], hu.shape[2]), spacing, target)
    if sizes == (hu.shape[1], hu.shape[2]):
        return hu.float(), new_spacing
    out = torch.empty((hu.shape[0], *sizes), dtype=torch.float32, device=hu.device)
    for start in range(0, hu.shape[0], RESAMPLE_CHUNK):
        chunk = hu[start : start + RESAMPLE_CHUNK].float().unsqueeze(1)
        resampled = F.interpolate(chunk, size=sizes, mode="bilinear", align_corners=False)
        out[start : start + RESAMPLE_CHUNK] = resampled[:, 0]
    return out, new_spacing


def window_torch(hu: torch.Tensor, low: float = WINDOW_HU[0], high: float = WINDOW_HU[1]) -> torch.Tensor:
    """Map HU linearly from [low, high] to [0, 1], clipped (a new float32 tensor)."""
    if high <= low:
        raise ValueError("window needs high > low")
    return ((hu.float() - low) / (high - low)).clamp_(0.0, 1.0)
