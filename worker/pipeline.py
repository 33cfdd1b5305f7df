"""The scoring pipeline as explicit steps: select series → load volume → resample → lungs →
lesions → severity. Each step is a function with explicit inputs and outputs; only
:func:`read_datasets` touches files.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from pydicom import Dataset

from models.dicom_headers import SliceHeader
from models.errors import ImplausiblePixelSpacingError, ModelOutputError, PixelDecodeError
from models.findings import LesionDescriptors, ScoreFlag, check_masks, describe_lesions, severity_is_lower_bound
from models.lesions_threshold import segment_lesions
from models.preprocessing import resample_inplane
from models.severity import LungSeverity, lung_severity
from models.threshold_method import ThresholdMasks, threshold_lungs
from models.volume import CtVolume, hu_volume
from worker.series_selection import SeriesCriteria, SeriesSelection, select_series, too_many_voxels

if TYPE_CHECKING:  # torch is imported only where networks are configured
    from models.inference import NetworkPrediction, TriageNetworks

METHOD_THRESHOLD = "threshold"
#: Bump when the threshold method's constants or steps change: results keep the version they used.
THRESHOLD_MODEL_VERSION = "threshold-2.0"
THRESHOLD_NOTE = (
    "Classical HU-threshold lungs and lesions, no trained weights; identification is not "
    "estimated by this method (null)."
)

@dataclass
class StepTimer:
    """Seconds spent in each named step, in order."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)


@dataclass(frozen=True)
class StudyMasks:
    """Lungs and lesions on the scoring grid (the volume resampled in-plane), where that grid
    lies in the patient (LPS), and the grid's HU for pictures. Canonical axis order."""

    hu: np.ndarray  # int16
    lung_labels: np.ndarray  # uint8: 0, 1 right, 2 left
    lesions: np.ndarray  # bool
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]


def grid_masks(volume: CtVolume, hu: np.ndarray, spacing: tuple[float, float, float], lung_labels: np.ndarray,
               lesions: np.ndarray) -> StudyMasks:
    """Place masks computed on ``resample_inplane``'s grid: it keeps the field of view, so the
    first in-plane voxel centre moves by half the change of spacing."""
    origin = np.asarray(volume.origin, dtype=float)
    for axis in (1, 2):
        origin = origin + np.asarray(volume.direction[axis]) * (spacing[axis] - volume.spacing[axis]) / 2
    return StudyMasks(
        hu=np.clip(np.rint(hu), -32768, 32767).astype(np.int16),
        lung_labels=lung_labels.astype(np.uint8, copy=False),
        lesions=lesions.astype(bool, copy=False),
        spacing=tuple(float(v) for v in spacing),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=tuple(tuple(float(c) for c in d) for d in volume.direction),
    )


@dataclass(frozen=True)
class StudyScore:
    series_uid: str
    method: str
    model_version: str
    identification: float | None
    severity: LungSeverity
    timings: dict[str, float]
    details: dict[str, Any]
    masks: StudyMasks | None = None
    #: Reasons not to take the scores at face value (empty when the masks look plausible).
    flags: tuple[ScoreFlag, ...] = ()
    descriptors: LesionDescriptors | None = None

    @property
    def severity_lower_bound(self) -> bool:
        """The severity may under-read the disease: the worklist puts the study at least in CT-3."""
        return severity_is_lower_bound(self.flags)


def read_datasets(paths: Sequence[Path]) -> list[Dataset]:
    """Read the chosen series' files (pixel data decoded later, by hu_volume)."""
    datasets = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path))
        except Exception as exc:  # truncated or corrupt file on disk
            raise PixelDecodeError(f"instance file {path.name} cannot be read: {exc}") from exc
    return datasets


def score_volume(volume: CtVolume, inplane_spacing_mm: float,
                 timer: StepTimer) -> tuple[LungSeverity, StudyMasks, ThresholdMasks]:
    """Threshold lungs and lesions on a volume resampled in-plane, then per-lung severity."""
    with timer.step("resample"):
        hu, spacing = resample_inplane(volume.hu, volume.spacing, target=(inplane_spacing_mm, inplane_spacing_mm))
    with timer.step("lungs"):
        lungs = threshold_lungs(hu, spacing)
    with timer.step("lesions"):
        found = ThresholdMasks.of(lungs, segment_lesions(hu, lungs.lung_labels, spacing))
    with timer.step("severity"):
        severity = lung_severity(found.lung_labels, found.lesions, spacing)
    return severity, grid_masks(volume, hu, spacing, found.lung_labels, found.lesions), found


def score_volume_with_networks(
    volume: CtVolume, networks: TriageNetworks, inplane_spacing_mm: float, timer: StepTimer
) -> NetworkPrediction:
    """Network lungs (or threshold lungs where the bundle has none), lesions, identification."""
    return networks.predict(volume.hu, volume.spacing, inplane_spacing_mm=inplane_spacing_mm, timer=timer)


def score_study(
    slices: Sequence[SliceHeader],
    paths: dict[str, Path],
    *,
    criteria: SeriesCriteria,
    inplane_spacing_mm: float,
    on_selection: Callable[[SeriesSelection], None] | None = None,
    networks: TriageNetworks | None = None,
) -> StudyScore:
    """Score one study from its slice headers and the files of its instances.

    ``on_selection`` lets the caller record series decisions before the (slow) scoring or the
    rejection (NoUsableSeriesError), so a study that is rejected or later fails still shows
    which series was chosen and why others were not.
    ``networks`` (loaded once per worker process) selects the network method; without them
    the threshold method scores, and the result says so.
    """
    timer = StepTimer()
    with timer.step("select"):
        selection = select_series(slices, criteria)
    if on_selection is not None:  # before a rejection too: each series shows its own reason
        on_selection(selection)
    selection.require()
    chosen_uids = sorted({s.sop_instance_uid for s in slices if s.series_uid == selection.chosen})
    with timer.step("load"):
        volume = hu_volume(read_datasets([paths[uid] for uid in chosen_uids]))
    return score_ct_volume(str(selection.chosen), volume, inplane_spacing_mm=inplane_spacing_mm, networks=networks,
                           timer=timer, criteria=criteria)


def check_scoring_grid(volume: CtVolume, criteria: SeriesCriteria) -> None:
    """Before resampling: refuse in-plane spacings and sizes no worker should try (a NIfTI file
    has no headers to select on; a DICOM series was checked from its headers already)."""
    slices, rows, columns = volume.hu.shape
    in_plane = (float(volume.spacing[1]), float(volume.spacing[2]))
    lo, hi = criteria.min_pixel_spacing_mm, criteria.max_pixel_spacing_mm
    if not all(lo <= v <= hi for v in in_plane):
        raise ImplausiblePixelSpacingError(f"in-plane spacing {in_plane[0]:g} x {in_plane[1]:g} mm, "
                                           f"outside {lo:g}-{hi:g} mm")
    too_large = too_many_voxels(slices, rows, columns, in_plane, criteria)
    if too_large is not None:
        raise too_large


def score_ct_volume(series_uid: str, volume: CtVolume, *, inplane_spacing_mm: float,
                    networks: TriageNetworks | None = None, timer: StepTimer | None = None,
                    criteria: SeriesCriteria | None = None) -> StudyScore:
    """Score an already loaded volume (a DICOM series, or a NIfTI file in batch scoring).
    ``criteria`` bound its spacing and size (default limits where not given)."""
    timer = timer or StepTimer()
    check_scoring_grid(volume, criteria or SeriesCriteria(inplane_spacing_mm=inplane_spacing_mm))
    if networks is not None:
        return _network_score(series_uid, volume, networks, inplane_spacing_mm, timer)
    severity, masks, found = score_volume(volume, inplane_spacing_mm, timer)
    with timer.step("findings"):
        flags, descriptors = findings(masks, found.fluid_ml)
    timer.seconds["total"] = round(sum(timer.seconds.values()), 4)
    return StudyScore(
        series_uid=series_uid,
        method=METHOD_THRESHOLD,
        model_version=THRESHOLD_MODEL_VERSION,
        identification=None,
        severity=severity,
        timings=dict(timer.seconds),
        details={
            "note": THRESHOLD_NOTE,
            "volume_shape": list(volume.hu.shape),
            "volume_spacing_mm": list(volume.spacing),
            "severity": asdict(severity),
            "lungs_envelope": {"dense_lung_added_ml": found.added_ml, "fluid_set_apart_ml": found.fluid_ml},
            **findings_details(flags, descriptors),
        },
        masks=masks,
        flags=flags,
        descriptors=descriptors,
    )


def findings(masks: StudyMasks,
             fluid_ml: dict[str, float] | None = None) -> tuple[tuple[ScoreFlag, ...], LesionDescriptors]:
    """Quality flags and lesion descriptors of the masks on the scoring grid."""
    return (check_masks(masks.lung_labels, masks.spacing, fluid_ml),
            describe_lesions(masks.hu, masks.lung_labels, masks.lesions, masks.spacing))


def findings_details(flags: tuple[ScoreFlag, ...], descriptors: LesionDescriptors | None) -> dict[str, Any]:
    """How flags and descriptors are kept in a result's details (the API and the SR read them)."""
    return {
        "flags": [f.to_dict() for f in flags],
        "severity_lower_bound": severity_is_lower_bound(flags),
        "descriptors": descriptors.to_dict() if descriptors is not None else None,
    }


def check_finite(identification: float, severity: LungSeverity) -> None:
    """Refuse NaN or infinite scores: the worklist would sort on them, the PACS receive them."""
    values = {"identification": identification, **severity.to_dict()}
    bad = sorted(name for name, value in values.items() if not math.isfinite(value))
    if bad:
        raise ModelOutputError(f"the networks gave a non-finite {', '.join(bad)}")


def _network_score(
    series_uid: str, volume: CtVolume, networks: TriageNetworks, inplane_spacing_mm: float, timer: StepTimer
) -> StudyScore:
    prediction = score_volume_with_networks(volume, networks, inplane_spacing_mm, timer)
    check_finite(prediction.identification, prediction.severity)
    timer.seconds["total"] = round(sum(timer.seconds.values()), 4)
    hu, spacing = resample_inplane(volume.hu, volume.spacing, target=(inplane_spacing_mm, inplane_spacing_mm))
    masks = (grid_masks(volume, hu, spacing, prediction.lung_labels, prediction.lesion_mask)
             if hu.shape == prediction.lung_labels.shape else None)
    severity = prediction.severity
    flags, descriptors = findings(masks) if masks is not None else ((), None)
    return StudyScore(
        series_uid=series_uid,
        method=networks.method,
        model_version=networks.version,
        identification=prediction.identification,
        severity=severity,
        timings=dict(timer.seconds),
        details={
            "note": networks.note,
            "models": networks.describe(),
            "lungs_method": prediction.lungs_method,
            "synthetic_weights": networks.synthetic,
            "volume_shape": list(volume.hu.shape),
            "volume_spacing_mm": list(volume.spacing),
            **prediction.details,
            "severity": asdict(severity),
            **findings_details(flags, descriptors),
        },
        masks=masks,
        flags=flags,
        descriptors=descriptors,
    )
