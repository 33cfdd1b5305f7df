"""What a scoring says beside the percentages: quality flags and lesion descriptors.

Flags are the method's safety net: when the masks cannot be trusted (a lung much smaller than
the other, a hemithorax mostly dense, lungs cut by the scan range) the result says so with a
reason code instead of ranking the study silently. A flag with ``lower_bound`` means the
severity may under-read the disease (dense lung left out of the mask): the worklist puts such
a study at least in band CT-3 (``models.priority``).

Descriptors are facts a radiologist uses to read the pattern (where, how dense, how many, both
sides), measured on the masks; they are not a probability of anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from models.lungs_threshold import LEFT_LUNG, RIGHT_LUNG, mediastinum

#: Reason codes of :class:`ScoreFlag` (a bounded set: pages, the SR and metrics key on them).
LUNG_MASK_IMPLAUSIBLE = "LungMaskImplausible"
PARTIAL_COVERAGE = "PartialCoverage"
POSSIBLE_EFFUSION = "PossibleEffusion"

#: Lesion voxels at or above this HU are consolidation, below it ground glass (the usual split:
#: ground glass -700..-300 HU still shows vessels through it, consolidation hides them).
CONSOLIDATION_MIN_HU = -300.0
#: "Peripheral": in the outer third of the lung's depth under the costal and diaphragmatic pleura,
#: in each slice (depth is not measured from the mediastinal surface, where the hilum is).
PERIPHERAL_OUTER_FRACTION = 1.0 / 3.0
#: Both lungs must hold at least this share (%) of their volume as lesion to call it bilateral.
BILATERAL_MIN_PERCENT = 1.0


@dataclass(frozen=True)
class ScoreFlag:
    """A reason not to take the scores at face value."""

    code: str
    message: str
    #: The severity is a lower bound (diseased lung may be missing from the mask).
    lower_bound: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LungDescriptors:
    """One lung's lesion pattern. Shares are of that lung's lesion volume (0..1), None without lesions."""

    lesion_volume_ml: float
    peripheral_share: float | None
    ground_glass_share: float | None
    consolidation_share: float | None
    foci: int


@dataclass(frozen=True)
class LesionDescriptors:
    right: LungDescriptors
    left: LungDescriptors
    bilateral: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def severity_is_lower_bound(flags: tuple[ScoreFlag, ...] | list[ScoreFlag]) -> bool:
    return any(f.lower_bound for f in flags)


def describe_lesions(
    hu: np.ndarray, lung_labels: np.ndarray, lesions: np.ndarray, spacing: tuple[float, float, float]
) -> LesionDescriptors:
    """Per-lung lesion descriptors on the scoring grid (canonical axes, ``spacing`` in mm)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    consolidation = ndimage.median_filter(hu, size=(1, 3, 3)) >= CONSOLIDATION_MIN_HU  # noise-robust density
    peripheral = _peripheral_zone(lung_labels, spacing)
    per_side = {}
    for side in (RIGHT_LUNG, LEFT_LUNG):
        lung = lung_labels == side
        lesion = lesions & lung
        n = int(np.count_nonzero(lesion))
        if n == 0:
            per_side[side] = LungDescriptors(0.0, None, None, None, 0)
            continue
        dense = int(np.count_nonzero(lesion & consolidation))
        _, foci = ndimage.label(lesion, structure=ndimage.generate_binary_structure(3, 3))
        per_side[side] = LungDescriptors(
            lesion_volume_ml=round(n * voxel_ml, 2),
            peripheral_share=round(float(np.count_nonzero(lesion & peripheral)) / n, 4),
            ground_glass_share=round((n - dense) / n, 4),
            consolidation_share=round(dense / n, 4),
            foci=int(foci),
        )
    lung_ml = {side: np.count_nonzero(lung_labels == side) * voxel_ml for side in (RIGHT_LUNG, LEFT_LUNG)}
    bilateral = all(
        lung_ml[side] > 0 and 100.0 * per_side[side].lesion_volume_ml / lung_ml[side] >= BILATERAL_MIN_PERCENT
        for side in (RIGHT_LUNG, LEFT_LUNG)
    )
    return LesionDescriptors(right=per_side[RIGHT_LUNG], left=per_side[LEFT_LUNG], bilateral=bilateral)


def _peripheral_zone(lung_labels: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Lung voxels whose in-plane depth under the pleura (not counting the mediastinal surface)
    is within the outer PERIPHERAL_OUTER_FRACTION of their lung's deepest point in that slice."""
    walls = ~(lung_labels > 0) & ~mediastinum(lung_labels)
    out = np.zeros(lung_labels.shape, dtype=bool)
    for side in (RIGHT_LUNG, LEFT_LUNG):
        lung = lung_labels == side
        for k in np.flatnonzero(lung.any(axis=(1, 2))):
            if not walls[k].any():
                continue
            depth = ndimage.distance_transform_edt(~walls[k], sampling=spacing[1:])
            out[k] |= lung[k] & (depth <= PERIPHERAL_OUTER_FRACTION * float(depth[lung[k]].max()))
    return out


#: A lung smaller than this share of the other is not what a chest holds (the left lung is
#: normally 0.8-0.9 of the right, the heart takes its room): most likely dense lung
#: (consolidation, atelectasis, effusion) is missing from its mask.
SMALL_LUNG_RATIO = 0.6
#: Lungs whose first or last slice on the volume's edge holds at least this share of their
#: largest slice area are cut by the scan range (an apex or a base is tapered where it ends).
CUT_SLICE_AREA_SHARE = 0.25
#: Fluid set apart from the lungs below this volume is not worth a flag.
EFFUSION_MIN_ML = 5.0


def check_masks(lung_labels: np.ndarray, spacing: tuple[float, float, float],
                fluid_ml: dict[str, float] | None = None) -> tuple[ScoreFlag, ...]:
    """Flags for masks that cannot be taken at face value (see the module docstring).

    ``fluid_ml``: per side, fluid-density regions set apart from the lung as probable effusion.
    """
    flags = []
    voxel_ml = float(np.prod(spacing)) / 1000.0
    right_ml = np.count_nonzero(lung_labels == RIGHT_LUNG) * voxel_ml
    left_ml = np.count_nonzero(lung_labels == LEFT_LUNG) * voxel_ml
    small, large = sorted((right_ml, left_ml))
    if large > 0 and small < SMALL_LUNG_RATIO * large:
        side = "right" if right_ml < left_ml else "left"
        flags.append(ScoreFlag(
            LUNG_MASK_IMPLAUSIBLE,
            f"the {side} lung mask holds {small:.0f} mL against {large:.0f} mL on the other side: dense lung "
            f"(consolidation, atelectasis or effusion) is likely missing from it, so its severity is a lower bound",
            lower_bound=True,
        ))
    fluid = {side: ml for side, ml in (fluid_ml or {}).items() if ml >= EFFUSION_MIN_ML}
    if fluid:
        where = " and ".join(f"{ml:.0f} mL beside the {side} lung" for side, ml in fluid.items())
        flags.append(ScoreFlag(
            POSSIBLE_EFFUSION,
            f"fluid-density tissue along the pleura ({where}) looks like pleural effusion and is not counted as "
            f"lung; if it is consolidated lung, the severity under-reads it",
        ))
    area = (lung_labels > 0).reshape(lung_labels.shape[0], -1).sum(axis=1)
    if area.max() > 0:
        cut = [name for name, k in (("base", 0), ("apex", -1)) if area[k] >= CUT_SLICE_AREA_SHARE * area.max()]
        if cut:
            flags.append(ScoreFlag(
                PARTIAL_COVERAGE,
                f"the lungs are cut by the scan range at the {' and the '.join(cut)}: severity covers the scanned "
                f"part only",
            ))
    return tuple(flags)
