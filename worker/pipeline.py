"""Scoring one study: select the series -> load its volume -> predict (``models.predictor``) ->
place the prediction's grid in the patient. Each step is a function with explicit inputs and
outputs; only :func:`read_datasets` touches files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import Dataset

from app.series_selection import SeriesCriteria, SeriesSelection, select_series, too_many_voxels
from models.dicom_headers import SliceHeader
from models.errors import ImplausiblePixelSpacingError, PixelDecodeError
from models.findings import LesionDescriptors, ScoreFlag, severity_is_lower_bound
from models.predictor import Prediction, Predictor
from models.severity import LungSeverity
from models.timing import StepTimer
from models.volume import CtVolume, Vec3, hu_volume


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
        spacing=_vec3(spacing),
        origin=_vec3(origin),
        direction=tuple(_vec3(d) for d in volume.direction),
    )


def _vec3(values: Sequence[float] | np.ndarray) -> Vec3:
    """A point or direction as three plain floats."""
    return float(values[0]), float(values[1]), float(values[2])


def placed_masks(volume: CtVolume, prediction: Prediction) -> StudyMasks:
    """A prediction's masks, on the grid it computed, placed in the patient."""
    return grid_masks(volume, prediction.hu, prediction.spacing, prediction.lung_labels, prediction.lesions)


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
    datasets: list[Dataset] = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path))
        except Exception as exc:  # truncated or corrupt file on disk
            raise PixelDecodeError(f"instance file {path.name} cannot be read: {exc}") from exc
    return datasets


def score_study(
    slices: Sequence[SliceHeader],
    paths: dict[str, Path],
    predictor: Predictor,
    *,
    criteria: SeriesCriteria,
    on_selection: Callable[[SeriesSelection], None] | None = None,
) -> StudyScore:
    """Score one study from its slice headers and the files of its instances.

    ``on_selection`` lets the caller record series decisions before the (slow) scoring or the
    rejection (NoUsableSeriesError), so a study that is rejected or later fails still shows
    which series was chosen and why others were not.
    """
    timer = StepTimer()
    with timer.step("select"):
        selection = select_series(slices, criteria)
    if on_selection is not None:  # before a rejection too: each series shows its own reason
        on_selection(selection)
    chosen = selection.require()
    with timer.step("load"):
        volume = load_series(chosen, slices, paths)
    return score_volume(chosen, volume, predictor, criteria=criteria, timer=timer)


def load_series(series_uid: str, slices: Sequence[SliceHeader], paths: dict[str, Path]) -> CtVolume:
    """The HU volume of one series, from the files of its instances."""
    uids = sorted({s.sop_instance_uid for s in slices if s.series_uid == series_uid})
    return hu_volume(read_datasets([paths[uid] for uid in uids]))


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


def score_volume(series_uid: str, volume: CtVolume, predictor: Predictor, *,
                 criteria: SeriesCriteria | None = None, timer: StepTimer | None = None) -> StudyScore:
    """Score an already loaded volume (a DICOM series, or a NIfTI file in batch scoring).
    ``criteria`` bound its spacing and size (default limits where not given); ``timer`` holds the
    steps already taken (selecting, loading)."""
    check_scoring_grid(volume, criteria or SeriesCriteria(inplane_spacing_mm=predictor.inplane_spacing_mm))
    prediction = predictor.predict(volume.hu, volume.spacing)
    timings = {**(timer.seconds if timer is not None else {}), **prediction.timings}
    timings["total"] = round(sum(timings.values()), 4)
    return StudyScore(
        series_uid=series_uid,
        method=prediction.method,
        model_version=prediction.model_version,
        identification=prediction.identification,
        severity=prediction.severity,
        timings=timings,
        details={
            **prediction.details,
            "volume_shape": list(volume.hu.shape),
            "volume_spacing_mm": list(volume.spacing),
            "severity": asdict(prediction.severity),
            **findings_details(prediction.flags, prediction.descriptors),
        },
        masks=placed_masks(volume, prediction),
        flags=prediction.flags,
        descriptors=prediction.descriptors,
    )


def findings_details(flags: tuple[ScoreFlag, ...], descriptors: LesionDescriptors | None) -> dict[str, Any]:
    """How flags and descriptors are kept in a result's details (the API and the SR read them)."""
    return {
        "flags": [f.to_dict() for f in flags],
        "severity_lower_bound": severity_is_lower_bound(flags),
        "descriptors": descriptors.to_dict() if descriptors is not None else None,
    }
