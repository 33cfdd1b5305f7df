"""Synthetic cohorts for offline training and evaluation: COVID-19 and three kinds of negatives.

The paper's test set (section 3.5) has COVID-19 positives and three negative cohorts: normal
lungs, bacterial pneumonia and lung nodules. :mod:`models.phantom` draws the positives (multifocal
peripheral ground glass and consolidation) and normal lungs; this module adds the two
pathological negatives on top of a normal phantom, so that identification has something to
tell apart and the evaluation table has every column:

* nodules: a few small solid spheres (soft-tissue density) inside the lungs;
* bacterial pneumonia: one large, homogeneous, dense (lobar) consolidation low in one lung,
  with a ground-glass halo (what makes density thresholds call it COVID-19-like, section 5.1).

Their lesion mask is empty (no COVID-19 lesions); their lung mask includes the pathology, as
the paper's lung annotation does. This is a stand-in for clinical data, nothing more.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from models.lungs_threshold import LEFT_LUNG, RIGHT_LUNG
from models.phantom import PhantomSpec, PhantomVolume, phantom_volume

COVID, NORMAL, BACTERIAL_PNEUMONIA, NODULES, OTHER = "covid", "normal", "bacterial_pneumonia", "nodules", "other"
NEGATIVE_COHORTS = (NORMAL, BACTERIAL_PNEUMONIA, NODULES)
COHORTS = (COVID, *NEGATIVE_COHORTS)

NODULE_COUNT = (2, 6)
NODULE_RADIUS_MM = (3.0, 9.0)
NODULE_HU = (10.0, 60.0)
#: Lobar consolidation: semi-axes (mm) and share of the lung's height where its centre lies.
LOBAR_SEMI_AXES_MM = ((20.0, 35.0), (18.0, 30.0), (14.0, 24.0))  # (z, y, x) ranges
LOBAR_HU = (10.0, 45.0)
LOBAR_HALO_MM = 8.0
HALO_HU = (-650.0, -500.0)


def cohort_phantom(cohort: str, spec: PhantomSpec, rng: np.random.Generator) -> PhantomVolume:
    """A phantom of ``cohort``; COVID-19 ones use the spec's severities, negatives none."""
    if cohort == COVID:
        return phantom_volume(spec)
    if cohort not in NEGATIVE_COHORTS:
        raise ValueError(f"unknown cohort {cohort!r}; expected one of {COHORTS}")
    phantom = phantom_volume(replace(spec, severity_left=0.0, severity_right=0.0))
    hu = phantom.hu.copy()
    if cohort == NODULES:
        for _ in range(int(rng.integers(NODULE_COUNT[0], NODULE_COUNT[1] + 1))):
            radius = rng.uniform(*NODULE_RADIUS_MM)
            _paint(hu, phantom, _random_lung_point(phantom, rng), np.full(3, radius), NODULE_HU, spec.noise_hu, rng)
    elif cohort == BACTERIAL_PNEUMONIA:
        side = int(rng.choice([RIGHT_LUNG, LEFT_LUNG]))
        centre = _random_lung_point(phantom, rng, side=side, lower_half=True)
        semi = np.array([rng.uniform(*r) for r in LOBAR_SEMI_AXES_MM])
        _paint(hu, phantom, centre, semi + LOBAR_HALO_MM, HALO_HU, spec.noise_hu, rng, side=side)
        _paint(hu, phantom, centre, semi, LOBAR_HU, spec.noise_hu, rng, side=side)
    truth = dict(phantom.truth, cohort=cohort)
    return replace(phantom, hu=hu, truth=truth)


def _random_lung_point(
    phantom: PhantomVolume, rng: np.random.Generator, side: int | None = None, lower_half: bool = False
) -> np.ndarray:
    """Voxel index (z, y, x) of a random lung voxel (optionally of one lung, in its lower half)."""
    mask = phantom.lungs > 0 if side is None else phantom.lungs == side
    idx = np.argwhere(mask)
    if lower_half:
        z_mid = (idx[:, 0].min() + idx[:, 0].max()) / 2
        idx = idx[idx[:, 0] <= z_mid]
    point: np.ndarray = idx[int(rng.integers(len(idx)))].astype(float)
    return point


def _paint(
    hu: np.ndarray,
    phantom: PhantomVolume,
    centre: np.ndarray,
    semi_mm: np.ndarray,
    hu_range: tuple[float, float],
    noise_hu: float,
    rng: np.random.Generator,
    side: int | None = None,
) -> None:
    """Set an ellipsoid (clipped to the lung) to one density plus the phantom's noise."""
    spacing = np.asarray(phantom.spacing)
    semi = semi_mm / spacing
    lo = np.maximum(np.floor(centre - semi).astype(int), 0)
    hi = np.minimum(np.ceil(centre + semi).astype(int) + 1, hu.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    grids = np.ogrid[box]
    inside = sum(((g - c) / s) ** 2 for g, c, s in zip(grids, centre, semi, strict=True)) <= 1.0
    lung = phantom.lungs[box] > 0 if side is None else phantom.lungs[box] == side
    region = inside & lung
    value = rng.uniform(*hu_range)
    noise = rng.standard_normal(int(np.count_nonzero(region))) * noise_hu
    hu[box][region] = np.clip(np.rint(value + noise), -1024, 3071).astype(hu.dtype)
