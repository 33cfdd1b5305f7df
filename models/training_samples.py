"""Network-ready training series and the batches the paper's training draws from them.

Each series is preprocessed once as at inference (2x2 mm in-plane, HU window to [0, 1]; for
the multitask network also cropped to the lungs' bounding box, section 4.1) and kept in memory
as float16. Batches follow section 4:

* lungs: slices drawn at random from series with a lung mask (30 per batch);
* multitask: ``batch_size`` series, half drawn from series with a lesion mask (they train the
  segmentation head), half from series with only a study-level label (they train the
  classification head); each series is thinned to at most ``slices_per_series`` slices by
  keeping every k-th slice from a random offset (a 3D map of bounded size for the classifier;
  validation and inference take the middle offset: ``models.multitask.classifier_slice_indices``).
  Series are zero-padded to a common shape and the batch carries each one's own extent: the
  classifier pools, and the segmentation loss averages, over each series' own voxels only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.datasets import SeriesRecord
from models.lung_network import lung_bounding_box
from models.lungs_threshold import segment_lungs
from models.multitask import classifier_slice_indices
from models.preprocessing import PAPER_INPLANE_SPACING_MM, resample_inplane, window

#: Lungs for cropping a series that has no lung mask: (resampled HU, spacing) -> bool mask.
LungSource = Callable[[np.ndarray, tuple[float, float, float]], np.ndarray]


@dataclass(frozen=True)
class PreparedSeries:
    """One series on the 2 mm grid, windowed (float16), with masks on the same grid."""

    id: str
    image: np.ndarray  # float16 (D, H, W) in [0, 1]
    lungs: np.ndarray | None  # bool
    lesions: np.ndarray | None  # bool
    covid: bool | None
    cohort: str
    spacing: tuple[float, float, float]


def resample_mask(mask: np.ndarray, spacing: tuple[float, float, float],
                  target: tuple[float, float] = PAPER_INPLANE_SPACING_MM) -> np.ndarray:
    """A mask on the resampled grid: linear interpolation of its indicator, >= 0.5."""
    resampled, _ = resample_inplane(mask.astype(np.float32), spacing, target)
    return resampled >= 0.5


def threshold_lung_source(hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    return segment_lungs(hu, spacing)


def prepare_series(
    record: SeriesRecord,
    *,
    crop_to_lungs: bool,
    lung_source: LungSource = threshold_lung_source,
    prefer_lung_source: bool = False,
) -> PreparedSeries:
    """Load, resample, window and (optionally) crop one series with its masks.

    The crop is the bounding box of the series' own lung mask, or of ``lung_source``'s lungs
    where it has none (or always, with ``prefer_lung_source``: the paper crops with its lungs
    network's masks, as inference will).
    """
    data = record.load()
    hu, spacing = resample_inplane(data.hu.astype(np.float32, copy=False), data.spacing)
    lungs = resample_mask(data.lungs > 0, data.spacing) if data.lungs is not None else None
    lesions = resample_mask(data.lesions, data.spacing) if data.lesions is not None else None
    image = window(hu)
    if crop_to_lungs:
        box = lung_bounding_box(lungs if lungs is not None and not prefer_lung_source else lung_source(hu, spacing))
        image = image[box]
        lungs = lungs[box] if lungs is not None else None
        lesions = lesions[box] if lesions is not None else None
    return PreparedSeries(
        id=record.id, image=np.ascontiguousarray(image, dtype=np.float16),
        lungs=None if lungs is None else np.ascontiguousarray(lungs),
        lesions=None if lesions is None else np.ascontiguousarray(lesions),
        covid=record.covid, cohort=record.cohort, spacing=spacing,
    )


# --- batches ------------------------------------------------------------------------------------


def thin_slices(depth: int, keep: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of every k-th slice from a random offset, k the smallest step leaving <= keep."""
    step = max(1, -(-depth // keep)) if keep > 0 else 1
    return np.array(classifier_slice_indices(depth, keep, int(rng.integers(step))), dtype=np.int64)


def pad_stack(arrays: Sequence[np.ndarray], fill: float = 0.0) -> np.ndarray:
    """Stack arrays of different shapes, padding each at the end of every axis to the largest."""
    shape = np.max([a.shape for a in arrays], axis=0)
    out = np.full((len(arrays), *shape), fill, dtype=np.result_type(*arrays))
    for i, a in enumerate(arrays):
        index: tuple[int | slice, ...] = (i, *(slice(0, n) for n in a.shape))
        out[index] = a
    return out


@dataclass(frozen=True)
class LungsBatch:
    images: torch.Tensor  # (S, 1, H, W)
    masks: torch.Tensor  # (S, 1, H, W) float


def lungs_batch(pool: Sequence[PreparedSeries], slices: int, rng: np.random.Generator) -> LungsBatch:
    """``slices`` random slices from random series with lung masks, padded with air."""
    images, masks = [], []
    for _ in range(slices):
        series = pool[int(rng.integers(len(pool)))]
        assert series.lungs is not None
        k = int(rng.integers(series.image.shape[0]))
        images.append(series.image[k].astype(np.float32))
        masks.append(series.lungs[k].astype(np.float32))
    return LungsBatch(torch.from_numpy(pad_stack(images))[:, None], torch.from_numpy(pad_stack(masks))[:, None])


@dataclass(frozen=True)
class MultitaskBatch:
    images: torch.Tensor  # (N, D, H, W)
    lesions: torch.Tensor  # (N, D, H, W) float; zeros where a series has no mask
    labels: torch.Tensor  # (N,) float; 0 where a series has no label
    seg_weight: torch.Tensor  # (N,) 1 for series drawn to train the segmentation head
    cls_weight: torch.Tensor  # (N,) 1 for series drawn to train the classification head
    extents: tuple[tuple[int, int, int], ...] = ()  # (d, h, w) of each series before padding


def multitask_pools(series: Sequence[PreparedSeries]) -> tuple[list[PreparedSeries], list[PreparedSeries]]:
    """(segmentation pool: series with a lesion mask; classification pool: labelled series
    without one). Where no label-only series exist, every labelled series is a classification
    example too."""
    seg = [s for s in series if s.lesions is not None]
    cls = [s for s in series if s.covid is not None and s.lesions is None]
    if not cls:
        cls = [s for s in series if s.covid is not None]
    return seg, cls


def multitask_batch(
    seg_pool: Sequence[PreparedSeries],
    cls_pool: Sequence[PreparedSeries],
    batch_size: int,
    slices_per_series: int,
    rng: np.random.Generator,
) -> MultitaskBatch:
    """A batch balanced between the two pools (odd sizes: the extra one by coin flip)."""
    if not seg_pool and not cls_pool:
        raise ValueError("no series with a lesion mask or a label to train on")
    chosen: list[tuple[PreparedSeries, bool]] = []  # (series, drawn for segmentation)
    for i in range(batch_size):
        for_seg = (i % 2 == 0) if batch_size % 2 == 0 or i < batch_size - 1 else bool(rng.integers(2))
        if not cls_pool:
            for_seg = True
        elif not seg_pool:
            for_seg = False
        pool = seg_pool if for_seg else cls_pool
        chosen.append((pool[int(rng.integers(len(pool)))], for_seg))
    images, lesions = [], []
    for series, _ in chosen:
        keep = thin_slices(series.image.shape[0], slices_per_series, rng)
        images.append(series.image[keep].astype(np.float32))
        mask = series.lesions[keep] if series.lesions is not None else np.zeros(images[-1].shape, dtype=bool)
        lesions.append(mask.astype(np.float32))
    return MultitaskBatch(
        images=torch.from_numpy(pad_stack(images)),
        lesions=torch.from_numpy(pad_stack(lesions)),
        labels=torch.tensor([float(bool(s.covid)) for s, _ in chosen]),
        seg_weight=torch.tensor([1.0 if seg else 0.0 for _, seg in chosen]),
        cls_weight=torch.tensor([0.0 if seg else 1.0 for _, seg in chosen]),
        extents=tuple((int(a.shape[0]), int(a.shape[1]), int(a.shape[2])) for a in images),
    )
