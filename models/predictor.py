"""One scoring interface: a :class:`Predictor` turns a canonical HU volume into one :class:`Prediction`.

Two methods implement it. :class:`ThresholdPredictor` is the weight-free method (HU-threshold lungs
and lesions, ``models.threshold_method``); :class:`NetworkPredictor` runs loaded networks
(``models.inference.TriageNetworks``). Both resample the volume in-plane once, to the scoring grid,
and return everything on that grid: its HU, lungs, lesions and spacing, the scores, quality flags
and lesion descriptors (``models.findings``), the seconds per step, and which method and version
produced it. :func:`predictor_for` is the one place that chooses between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from models.errors import ModelOutputError
from models.findings import LesionDescriptors, ScoreFlag, check_masks, describe_lesions
from models.lesions_threshold import segment_lesions
from models.preprocessing import PAPER_INPLANE_SPACING_MM, resample_inplane
from models.severity import LungSeverity, lung_severity
from models.threshold_method import ThresholdMasks, threshold_lungs
from models.timing import StepTimer

if TYPE_CHECKING:  # torch is imported only where networks are loaded
    from models.inference import TriageNetworks

Spacing = tuple[float, float, float]

METHOD_THRESHOLD = "threshold"
#: Bump when the threshold method's constants or steps change: results keep the version they used.
THRESHOLD_MODEL_VERSION = "threshold-2.0"
THRESHOLD_NOTE = (
    "Classical HU-threshold lungs and lesions, no trained weights; identification is not "
    "estimated by this method (null)."
)
DEFAULT_INPLANE_SPACING_MM = PAPER_INPLANE_SPACING_MM[0]


@dataclass(frozen=True)
class Prediction:
    """What one method found in one volume, on its scoring grid (the volume resampled in-plane,
    canonical axes; the grid keeps the field of view, see ``models.preprocessing.resample_inplane``)."""

    method: str
    model_version: str
    #: COVID-19 probability; None where the method does not estimate it (threshold).
    identification: float | None
    severity: LungSeverity
    hu: np.ndarray  # int16 HU on the grid (for findings and pictures)
    lung_labels: np.ndarray  # uint8: 0, 1 right, 2 left
    lesions: np.ndarray  # bool
    spacing: Spacing  # of the grid, mm
    timings: dict[str, float]
    #: Reasons not to take the scores at face value (empty when the masks look plausible).
    flags: tuple[ScoreFlag, ...]
    descriptors: LesionDescriptors
    #: What the method says about itself and this run (a note, weights, lung envelope), kept with the result.
    details: dict[str, Any]


@runtime_checkable
class Predictor(Protocol):
    """A scoring method: a canonical HU volume and its spacing (mm) in, one Prediction out."""

    @property
    def method(self) -> str: ...

    @property
    def model_version(self) -> str: ...

    @property
    def inplane_spacing_mm(self) -> float: ...

    def predict(self, hu: np.ndarray, spacing: Spacing) -> Prediction: ...


class ThresholdPredictor:
    """The weight-free method: threshold lungs (with the dense lung along the pleura) and lesions."""

    method = METHOD_THRESHOLD
    model_version = THRESHOLD_MODEL_VERSION

    def __init__(self, inplane_spacing_mm: float = DEFAULT_INPLANE_SPACING_MM) -> None:
        self.inplane_spacing_mm = inplane_spacing_mm

    def predict(self, hu: np.ndarray, spacing: Spacing) -> Prediction:
        timer = StepTimer()
        with timer.step("resample"):
            grid_hu, grid = resample_inplane(hu.astype(np.float32, copy=False), spacing,
                                             target=(self.inplane_spacing_mm, self.inplane_spacing_mm))
        with timer.step("lungs"):
            lungs = threshold_lungs(grid_hu, grid)
        with timer.step("lesions"):
            found = ThresholdMasks.of(lungs, segment_lesions(grid_hu, lungs.lung_labels, grid))
        with timer.step("severity"):
            severity = lung_severity(found.lung_labels, found.lesions, grid)
        hu16, labels, lesions = grid_arrays(grid_hu, found.lung_labels, found.lesions)
        with timer.step("findings"):
            flags, descriptors = findings(hu16, labels, lesions, grid, found.fluid_ml)
        return Prediction(
            method=self.method, model_version=self.model_version, identification=None, severity=severity,
            hu=hu16, lung_labels=labels, lesions=lesions, spacing=grid, timings=dict(timer.seconds),
            flags=flags, descriptors=descriptors,
            details={"note": THRESHOLD_NOTE,
                     "lungs_envelope": {"dense_lung_added_ml": found.added_ml, "fluid_set_apart_ml": found.fluid_ml}},
        )


class NetworkPredictor:
    """Loaded networks (lungs network, or threshold lungs where the bundle has none; multitask network
    for lesions and identification). Masks come back on the grid the networks computed."""

    def __init__(self, networks: TriageNetworks, inplane_spacing_mm: float = DEFAULT_INPLANE_SPACING_MM) -> None:
        self.networks = networks
        self.inplane_spacing_mm = inplane_spacing_mm

    @property
    def method(self) -> str:
        return self.networks.method

    @property
    def model_version(self) -> str:
        return self.networks.version

    def predict(self, hu: np.ndarray, spacing: Spacing) -> Prediction:
        timer = StepTimer()
        out = self.networks.predict(hu, spacing, inplane_spacing_mm=self.inplane_spacing_mm, timer=timer)
        check_finite(out.identification, out.severity)
        hu16, labels, lesions = grid_arrays(out.hu, out.lung_labels, out.lesion_mask)
        with timer.step("findings"):
            flags, descriptors = findings(hu16, labels, lesions, out.spacing)
        networks = self.networks
        return Prediction(
            method=self.method, model_version=self.model_version, identification=out.identification,
            severity=out.severity, hu=hu16, lung_labels=labels, lesions=lesions, spacing=out.spacing,
            timings=dict(timer.seconds), flags=flags, descriptors=descriptors,
            details={"note": networks.note, "models": networks.describe(), "lungs_method": out.lungs_method,
                     "synthetic_weights": networks.synthetic, **out.details},
        )


def predictor_for(networks: TriageNetworks | None,
                  inplane_spacing_mm: float = DEFAULT_INPLANE_SPACING_MM) -> Predictor:
    """The method a volume is scored with: the networks where loaded, else the threshold method."""
    if networks is None:
        return ThresholdPredictor(inplane_spacing_mm)
    return NetworkPredictor(networks, inplane_spacing_mm)


def grid_arrays(hu: np.ndarray, lung_labels: np.ndarray,
                lesions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The grid's HU as int16 (what pictures and descriptors read), labels as uint8, lesions as bool."""
    return (np.clip(np.rint(hu), -32768, 32767).astype(np.int16), lung_labels.astype(np.uint8, copy=False),
            lesions.astype(bool, copy=False))


def findings(hu: np.ndarray, lung_labels: np.ndarray, lesions: np.ndarray, spacing: Spacing,
             fluid_ml: dict[str, float] | None = None) -> tuple[tuple[ScoreFlag, ...], LesionDescriptors]:
    """Quality flags and lesion descriptors of masks on the scoring grid."""
    return check_masks(lung_labels, spacing, fluid_ml), describe_lesions(hu, lung_labels, lesions, spacing)


def check_finite(identification: float, severity: LungSeverity) -> None:
    """Refuse NaN or infinite scores: a worklist would sort on them, a PACS receive them."""
    values = {"identification": identification, **severity.to_dict()}
    bad = sorted(name for name, value in values.items() if not math.isfinite(value))
    if bad:
        raise ModelOutputError(f"the networks gave a non-finite {', '.join(bad)}")
