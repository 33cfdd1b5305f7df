"""Severity as the paper defines it: lesion volume over lung volume, per lung, worst lung wins.

Triage guidelines (Moscow CT-0..CT-4, Colombi et al.) grade the more affected lung, so the
score is the maximum of the two per-lung percentages rather than a whole-chest percentage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from models.lungs_threshold import LEFT_LUNG, RIGHT_LUNG


@dataclass(frozen=True)
class LungSeverity:
    """Per-lung volumes (mL) and percentages (0..100) of lung volume affected."""

    severity_left: float
    severity_right: float
    severity: float  # max of left and right
    lung_volume_left_ml: float
    lung_volume_right_ml: float
    lesion_volume_left_ml: float
    lesion_volume_right_ml: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def max_lung_severity(left: float, right: float) -> float:
    """The triage score: the worse lung's percentage."""
    return float(max(left, right))


def lung_severity(
    lung_labels: np.ndarray, lesion_mask: np.ndarray, spacing: tuple[float, float, float]
) -> LungSeverity:
    """Percent of each lung covered by ``lesion_mask`` (lesion voxels outside lungs are ignored).

    A lung with no voxels (not found, or absent) scores 0 %: there is nothing to measure.
    """
    if lung_labels.shape != lesion_mask.shape:
        raise ValueError(f"lung labels {lung_labels.shape} and lesion mask {lesion_mask.shape} differ in shape")
    ml = float(np.prod(spacing)) / 1000.0
    lesion = lesion_mask.astype(bool, copy=False)
    volumes = {}
    for side in (RIGHT_LUNG, LEFT_LUNG):
        lung = lung_labels == side
        volumes[side] = (float(np.count_nonzero(lung) * ml), float(np.count_nonzero(lung & lesion) * ml))

    def pct(side: int) -> float:
        lung_ml, lesion_ml = volumes[side]
        return 100.0 * lesion_ml / lung_ml if lung_ml > 0 else 0.0

    left, right = pct(LEFT_LUNG), pct(RIGHT_LUNG)
    return LungSeverity(
        severity_left=left,
        severity_right=right,
        severity=max_lung_severity(left, right),
        lung_volume_left_ml=volumes[LEFT_LUNG][0],
        lung_volume_right_ml=volumes[RIGHT_LUNG][0],
        lesion_volume_left_ml=volumes[LEFT_LUNG][1],
        lesion_volume_right_ml=volumes[RIGHT_LUNG][1],
    )
