"""What a scoring leaves beside the scores: masks on the scoring grid and the two pictures.

Files go under ``storage_root/_derived/<study>/job<id>/``; the result's details point at them,
the API serves the pictures, and the export to the PACS (SEG, SR, secondary capture) reads
the masks from there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from app.dicom.storage import derived_study_dir
from models.rendering import axial_overlay, projection_overlay
from worker.pipeline import StudyMasks

MASKS_FILE = "masks.npz"
AXIAL_PNG = "axial.png"
PROJECTION_PNG = "projection.png"


def derived_dir(storage_root: Path, study_uid: str, job_id: int) -> Path:
    return derived_study_dir(storage_root, study_uid) / f"job{job_id}"


def save_masks(path: Path, masks: StudyMasks) -> None:
    np.savez_compressed(path, hu=masks.hu, lung_labels=masks.lung_labels, lesions=masks.lesions,
                        spacing=np.asarray(masks.spacing), origin=np.asarray(masks.origin),
                        direction=np.asarray(masks.direction))


def load_masks(path: Path) -> StudyMasks:
    with np.load(path) as data:
        return StudyMasks(
            hu=data["hu"], lung_labels=data["lung_labels"], lesions=data["lesions"],
            spacing=tuple(data["spacing"].tolist()), origin=tuple(data["origin"].tolist()),
            direction=tuple(tuple(row) for row in data["direction"].tolist()),
        )


def save_derived(storage_root: Path, study_uid: str, job_id: int, masks: StudyMasks) -> dict[str, str]:
    """Write masks and pictures; returns their paths relative to the storage root."""
    folder = derived_dir(storage_root, study_uid, job_id)
    folder.mkdir(parents=True, exist_ok=True)
    save_masks(folder / MASKS_FILE, masks)
    Image.fromarray(axial_overlay(masks.hu, masks.lung_labels, masks.lesions, masks.spacing)).save(folder / AXIAL_PNG)
    Image.fromarray(projection_overlay(masks.hu, masks.lung_labels, masks.lesions, masks.spacing)).save(
        folder / PROJECTION_PNG)
    return {name: str((folder / file).relative_to(storage_root))
            for name, file in (("masks", MASKS_FILE), ("axial", AXIAL_PNG), ("projection", PROJECTION_PNG))}
