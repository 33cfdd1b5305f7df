"""The lungs network of Goncharov et al. (2021, sections 2.1 and 4.2) and its post-processing.

A slice-wise residual U-Net predicts one binary mask of both lungs *including* pathology
(consolidation, effusion, nodules): what the threshold method cannot see. The mask is then
cleaned (largest components, enclosed holes filled) and split into the patient's right and left
lung by :func:`models.lungs_threshold.split_lungs`, which works in the canonical orientation
(axis 2 = patient right -> left), so the labels follow the patient and not the image layout.
The paper splits with 2-means on voxel coordinates; the erosion/valley split used here also
separates lungs that touch at the anterior junction, where 2-means can cut across a lung.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from models.lungs_threshold import SPLIT_MIN_SHARE, split_lungs
from models.unet import PreActivationHead, UNet2d, UNetConfig

#: Probability above which a pixel is lung (the authors' value).
LUNG_PROBABILITY_THRESHOLD = 0.5
#: A second component is the other lung when it holds at least this share of the pair.
SECOND_LUNG_MIN_SHARE = SPLIT_MIN_SHARE


@dataclass(frozen=True)
class LungNetConfig:
    """Architecture of a :class:`LungSegmentationNet`."""

    unet: UNetConfig = field(default_factory=UNetConfig)

    @property
    def architecture(self) -> str:
        return "lungs-unet2d"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LungNetConfig:
        return cls(unet=UNetConfig(**data.get("unet", {})))


class LungSegmentationNet(nn.Module):
    """(S, 1, H, W) windowed slices -> (S, 1, H, W) logits of 'inside a lung'."""

    def __init__(self, config: LungNetConfig = LungNetConfig()) -> None:
        super().__init__()
        self.config = config
        self.backbone = UNet2d(config.unet)
        self.head = PreActivationHead(self.backbone.top_channels, 1)

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.backbone(slices)[0])
        return logits


def lung_mask_from_probabilities(
    probabilities: np.ndarray, threshold: float = LUNG_PROBABILITY_THRESHOLD
) -> np.ndarray:
    """Threshold, keep the lungs (largest 3D component and a second one of comparable size), fill
    what they enclose in each slice. Stray positives (bowel gas, the other side of the table)
    are dropped; vessels and lesions the network missed inside a lung are filled in."""
    mask = probabilities >= threshold
    comp, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(comp.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    keep = [order[0] + 1]
    if n >= 2 and sizes[order[1]] >= SECOND_LUNG_MIN_SHARE * (sizes[order[0]] + sizes[order[1]]):
        keep.append(order[1] + 1)
    lungs = np.isin(comp, keep)
    for k in np.flatnonzero(lungs.any(axis=(1, 2))):
        lungs[k] = ndimage.binary_fill_holes(lungs[k])
    return lungs


def lung_labels_from_probabilities(
    probabilities: np.ndarray, spacing: tuple[float, float, float], threshold: float = LUNG_PROBABILITY_THRESHOLD
) -> np.ndarray:
    """Labels 0, 1 (patient right), 2 (patient left) from the network's lung probabilities."""
    return split_lungs(lung_mask_from_probabilities(probabilities, threshold), spacing)


def lung_bounding_box(lungs: np.ndarray) -> tuple[slice, slice, slice]:
    """Smallest box holding every lung voxel (the multitask network's field of view)."""
    if not lungs.any():
        raise ValueError("empty lung mask: no box to crop to")
    out = []
    for axis in range(3):
        present = np.flatnonzero(lungs.any(axis=tuple(a for a in range(3) if a != axis)))
        out.append(slice(int(present[0]), int(present[-1]) + 1))
    return out[0], out[1], out[2]
