"""Ground glass of known volume implanted into real CT: a ground truth for severity on real anatomy.

Public severity datasets are scarce and their masks disagree; an implant into a real scan gives
an exact answer (this many mL of this lung are now ground glass) with real noise, vessels,
airways and scanner kernels around it. Pure numpy on the canonical grid (axis 0 inferior ->
superior, 1 anterior -> posterior, 2 patient right -> left), spacing in mm passed explicitly;
reading and writing DICOM lives in ``app/implant_io.py``.

The region is the ``fraction`` of one lung's voxels nearest (in mm) to a seed point chosen
posterior and near the pleura, mid-lung in z, like typical COVID-19 ground glass; lung that is
already dense (a tumour, dependent density) is left out of it, so the truth is new disease. Inside it a
smooth random texture between ``hu_min`` and ``hu_max`` HU is added to aerated lung only, with a
taper that leaves voxels already denser than -400 HU (vessels, airway walls, nodules) unchanged:
parenchyma at -850 HU becomes about -550 HU, which is what ground glass looks like.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage, special

from models.lungs_threshold import LEFT_LUNG, RIGHT_LUNG
from models.preprocessing import PAPER_INPLANE_SPACING_MM, resample_inplane
from models.threshold_method import threshold_lungs

SIDES = {"right": RIGHT_LUNG, "left": LEFT_LUNG}
DEFAULT_HU_RANGE = (250.0, 350.0)
#: Voxels at or above this HU get nothing (already dense: vessels, airway walls, nodules) ...
TAPER_TOP_HU = -400.0
#: ... and voxels this far below it get the full amount (parenchyma, about -850 HU).
TAPER_WIDTH_HU = 200.0
#: Correlation length of the texture: ground glass is patchy on a scale of millimetres, not voxels.
TEXTURE_SIGMA_MM = 4.0
#: Seed: mid-lung in z (this share of the lung's z extent kept at each end is excluded), so the
#: region is not cut by the scan range; posterior (at or behind this percentile of the lung's
#: anterior-posterior positions); near the pleura (at this depth from the lung border, mm).
SEED_Z_MARGIN = 0.25
SEED_POSTERIOR_PERCENTILE = 60.0
SEED_DEPTH_MM = (8.0, 25.0)
#: Lung that is already dense is left out of the region: ground glass over a tumour or an
#: existing opacity changes no score, and the truth would over-state the rise. Dense means a
#: local mean (Gaussian, DENSE_SIGMA_MM) above DENSE_MIN_HU that is thicker than DENSE_OPENING_MM
#: in radius (morphological opening) and at least DENSE_MIN_ML: masses, consolidation, thick
#: dependent density. Vessels stay in the region: holes around them would be filled by any
#: lesion segmentation's smoothing and counted as ground glass the truth does not hold.
DENSE_SIGMA_MM = 2.0
DENSE_MIN_HU = -700.0
DENSE_OPENING_MM = 4.0
DENSE_MIN_ML = 1.0


@dataclass(frozen=True)
class ImplantTruth:
    """What was implanted, in the terms a severity score is checked against."""

    lung: str  # "left" or "right" (the patient's)
    fraction_requested: float  # 0..1 of that lung
    fraction: float  # implanted volume / lung volume, exact on the grid
    implanted_volume_ml: float  # lung voxels inside the region
    lung_volume_ml: float  # that lung's volume in the mask the region was taken from
    implanted_voxels: int
    aerated_share: float  # of the region's voxels, those the texture changed (the rest were dense)
    hu_min: float
    hu_max: float
    seed: int
    seed_voxel: tuple[int, int, int]  # canonical index of the region's centre
    excluded_dense_ml: float  # of that lung, already dense and so left out of the region

    @property
    def severity_rise(self) -> float:
        """Percentage points this lung's severity should rise by if the region was healthy lung."""
        return 100.0 * self.fraction

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "severity_rise_percent": self.severity_rise}


@dataclass(frozen=True)
class Implant:
    delta: np.ndarray  # float32 HU to add, canonical grid (0 outside the region and on dense voxels)
    region: np.ndarray  # bool: the lung voxels implanted (the truth's volume)
    truth: ImplantTruth


def labels_to_source_grid(labels: np.ndarray, source_shape: tuple[int, int, int],
                          source_spacing: tuple[float, float, float]) -> np.ndarray:
    """Nearest-neighbour copy of labels made on :func:`resample_inplane`'s grid back to the source
    grid. That grid keeps the field of view, so source voxel i (centre at (i + 1/2) source
    voxels from the edge) falls in resampled voxel floor((i + 1/2) * n_resampled / n_source)."""
    if labels.shape[0] != source_shape[0]:
        raise ValueError(f"labels have {labels.shape[0]} slices, the source {source_shape[0]}: only in-plane "
                         "resampling can be undone")
    index = []
    for axis in (1, 2):
        n_src, n_dst = source_shape[axis], labels.shape[axis]
        i = np.arange(n_src, dtype=np.int64)
        index.append(np.minimum((2 * i + 1) * n_dst // (2 * n_src), n_dst - 1))
    return labels[:, index[0][:, None], index[1][None, :]]


def source_grid_lung_labels(hu: np.ndarray, spacing: tuple[float, float, float],
                            inplane_mm: float = PAPER_INPLANE_SPACING_MM[0]) -> np.ndarray:
    """Right (1) and left (2) lung on the source grid from the scoring pipeline's threshold lungs
    (found on the 2 mm grid, where their constants hold), so the implant's lung is the scorer's."""
    resampled, grid_spacing = resample_inplane(hu, spacing, target=(inplane_mm, inplane_mm))
    labels = threshold_lungs(resampled, grid_spacing).lung_labels
    return labels_to_source_grid(labels, hu.shape, spacing)


def ground_glass_weight(hu: np.ndarray) -> np.ndarray:
    """Share of the texture each voxel gets: 1 for aerated parenchyma, tapering to 0 at -400 HU."""
    weight: np.ndarray = np.clip((TAPER_TOP_HU - hu.astype(np.float32)) / TAPER_WIDTH_HU, 0.0, 1.0)
    return weight


def already_dense(hu: np.ndarray, lung: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Parts of ``lung`` that are already dense (see DENSE_MIN_HU): not healthy lung to implant into."""
    box = ndimage.find_objects(lung.astype(np.uint8))[0]
    smooth = ndimage.gaussian_filter(hu[box].astype(np.float32), [DENSE_SIGMA_MM / s for s in spacing],
                                     mode="nearest")
    dense = (smooth > DENSE_MIN_HU) & lung[box]
    del smooth
    inner = (slice(1, -1),) * 3
    core = ndimage.distance_transform_edt(np.pad(dense, 1), sampling=spacing)[inner] > DENSE_OPENING_MM
    dense &= ndimage.distance_transform_edt(np.pad(~core, 1, constant_values=True), sampling=spacing)[inner] \
        <= DENSE_OPENING_MM
    comp, n = ndimage.label(dense, structure=ndimage.generate_binary_structure(3, 3))
    out = np.zeros(lung.shape, dtype=bool)
    if n:
        big = np.bincount(comp.ravel()) * float(np.prod(spacing)) / 1000.0 >= DENSE_MIN_ML
        big[0] = False
        out[box] = big[comp]
    return out


def choose_seed(lung: np.ndarray, spacing: tuple[float, float, float],
                rng: np.random.Generator) -> tuple[int, int, int]:
    """A voxel of ``lung`` that is mid-lung in z, posterior and near the pleura, drawn by ``rng``
    (relaxing those criteria one by one where a lung has no such voxel)."""
    box = ndimage.find_objects(lung.astype(np.uint8))[0]
    crop = lung[box]
    depth = ndimage.distance_transform_edt(np.pad(crop, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    coords = np.nonzero(crop)
    z0, z1 = coords[0].min(), coords[0].max()
    margin = SEED_Z_MARGIN * (z1 - z0)
    mid_z = (coords[0] >= z0 + margin) & (coords[0] <= z1 - margin)
    posterior = coords[1] >= np.percentile(coords[1], SEED_POSTERIOR_PERCENTILE)
    d = depth[coords]
    near_pleura = (d >= SEED_DEPTH_MM[0]) & (d <= SEED_DEPTH_MM[1])
    for wanted in (mid_z & posterior & near_pleura, mid_z & posterior, mid_z, np.ones_like(mid_z)):
        candidates = np.flatnonzero(wanted)
        if candidates.size:
            break
    pick = int(candidates[rng.integers(candidates.size)])
    return (int(coords[0][pick] + box[0].start), int(coords[1][pick] + box[1].start),
            int(coords[2][pick] + box[2].start))


def nearest_region(lung: np.ndarray, seed_voxel: tuple[int, int, int], voxels: int,
                   spacing: tuple[float, float, float]) -> np.ndarray:
    """The ``voxels`` voxels of ``lung`` nearest to ``seed_voxel`` in millimetres (a ball, cut
    by the lung's own shape): compact, and exactly the asked volume."""
    region = np.zeros(lung.shape, dtype=bool)
    if voxels <= 0:
        return region
    coords = np.nonzero(lung)
    dist2 = np.zeros(coords[0].size, dtype=np.float64)
    for axis in range(3):
        dist2 += ((coords[axis] - seed_voxel[axis]) * spacing[axis]) ** 2
    if voxels < dist2.size:
        keep = np.argpartition(dist2, voxels - 1)[:voxels]
        region[tuple(c[keep] for c in coords)] = True
    else:
        region[coords] = True
    return region


def smooth_texture(shape: tuple[int, ...], spacing: tuple[float, float, float], hu_min: float, hu_max: float,
                   rng: np.random.Generator) -> np.ndarray:
    """Correlated noise mapped to a uniform spread between ``hu_min`` and ``hu_max`` (float32)."""
    noise = rng.standard_normal(shape).astype(np.float32)
    smooth = ndimage.gaussian_filter(noise, sigma=[TEXTURE_SIGMA_MM / s for s in spacing], mode="reflect")
    smooth /= max(float(smooth.std()), 1e-6)
    return (hu_min + special.ndtr(smooth) * (hu_max - hu_min)).astype(np.float32)


def implant_ground_glass(hu: np.ndarray, spacing: tuple[float, float, float], lung_labels: np.ndarray, *,
                         lung: str, fraction: float, seed: int = 0,
                         hu_range: tuple[float, float] = DEFAULT_HU_RANGE) -> Implant:
    """Ground glass over ``fraction`` of one lung of a canonical HU volume (not modified: add
    ``delta``). Deterministic given ``seed``; only voxels of the chosen lung change."""
    if lung not in SIDES:
        raise ValueError(f"lung must be 'left' or 'right', not {lung!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], not {fraction}")
    hu_min, hu_max = float(hu_range[0]), float(hu_range[1])
    if not 0.0 <= hu_min <= hu_max:
        raise ValueError(f"need 0 <= hu_min <= hu_max, got {hu_min}..{hu_max}")
    if hu.shape != lung_labels.shape:
        raise ValueError(f"HU volume {hu.shape} and lung labels {lung_labels.shape} differ in shape")
    mask = lung_labels == SIDES[lung]
    lung_voxels = int(np.count_nonzero(mask))
    if lung_voxels == 0:
        raise ValueError(f"the {lung} lung is not in the lung labels")
    healthy = mask & ~already_dense(hu, mask, spacing)
    wanted = int(round(fraction * lung_voxels))
    if wanted > np.count_nonzero(healthy):
        raise ValueError(f"{fraction:.0%} of the {lung} lung is more than its healthy part "
                         f"({np.count_nonzero(healthy) / lung_voxels:.0%})")
    rng = np.random.default_rng(seed)
    seed_voxel = choose_seed(healthy, spacing, rng)
    region = nearest_region(healthy, seed_voxel, wanted, spacing)
    delta = np.zeros(hu.shape, dtype=np.float32)
    box = ndimage.find_objects(region.astype(np.uint8))[0] if wanted else None
    aerated = 0
    if box is not None:
        weight = ground_glass_weight(hu[box]) * region[box]
        texture = smooth_texture(weight.shape, spacing, hu_min, hu_max, rng)
        delta[box] = weight * texture
        aerated = int(np.count_nonzero(weight > 0))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    truth = ImplantTruth(
        lung=lung, fraction_requested=float(fraction), fraction=wanted / lung_voxels,
        implanted_volume_ml=wanted * voxel_ml, lung_volume_ml=lung_voxels * voxel_ml, implanted_voxels=wanted,
        aerated_share=aerated / wanted if wanted else 0.0, hu_min=hu_min, hu_max=hu_max, seed=int(seed),
        seed_voxel=seed_voxel, excluded_dense_ml=(lung_voxels - int(np.count_nonzero(healthy))) * voxel_ml,
    )
    return Implant(delta=delta, region=region, truth=truth)
