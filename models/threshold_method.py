"""The weight-free method's masks, in one place: what the worker, ``cttriage score``, the
evaluation and the networks' lung fallback all run.

Lungs: HU threshold (``models.lungs_threshold``), split into right and left, then the dense lung
along the pleura given back and pleural fluid set apart (``models.lung_envelope``). Lesions:
density above the lung's own baseline, vessels set aside (``models.lesions_threshold``).
Everything on the 2 mm scoring grid, canonical axes, spacing in mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.lesions_threshold import segment_lesions
from models.lung_envelope import EnvelopeResult, pleural_envelope
from models.lungs_threshold import segment_lungs, split_lungs


@dataclass(frozen=True)
class ThresholdMasks:
    lung_labels: np.ndarray  # uint8: 0, 1 right, 2 left
    lesions: np.ndarray  # bool
    #: Dense lung given back per side (mL) and fluid set apart per side (mL).
    added_ml: dict[str, float]
    fluid_ml: dict[str, float]

    @classmethod
    def of(cls, lungs: EnvelopeResult, lesions: np.ndarray) -> ThresholdMasks:
        return cls(lungs.lung_labels, lesions, lungs.added_ml, lungs.fluid_ml)


def threshold_lungs(hu: np.ndarray, spacing: tuple[float, float, float]) -> EnvelopeResult:
    """Right (1) and left (2) lung labels, dense lung along the pleura included."""
    return pleural_envelope(hu, split_lungs(segment_lungs(hu, spacing), spacing), spacing)


def threshold_masks(hu: np.ndarray, spacing: tuple[float, float, float]) -> ThresholdMasks:
    lungs = threshold_lungs(hu, spacing)
    return ThresholdMasks.of(lungs, segment_lesions(hu, lungs.lung_labels, spacing))
