"""DICOM SEG of a scoring: right lung, left lung and lesions on the source images' own grid.

The masks live on the scoring grid (canonical axis order, in-plane resampled, see
:class:`worker.pipeline.StudyMasks`); a SEG must follow the source instances. Every source
pixel centre is placed in the patient (LPS) from its frame's ImagePositionPatient,
ImageOrientationPatient and PixelSpacing, then looked up in the grid by nearest neighbour. So
a source stored mirrored, flipped or in reverse slice order gets its frames right without any
assumption about how it was stored.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from models.dicom_headers import SliceHeader, slice_headers
from models.lungs_threshold import LEFT_LUNG, RIGHT_LUNG
from worker.export_common import (
    LEFT,
    LUNG,
    MODEL_NAME,
    RIGHT,
    ExportScores,
    NewInstance,
    label,
    software_versions,
)
from worker.pipeline import StudyMasks

#: Segment numbers (the SR's measurement groups reference them).
SEGMENT_RIGHT_LUNG, SEGMENT_LEFT_LUNG, SEGMENT_LESIONS = 1, 2, 3
#: Bit of the lesion flag in the per-pixel code that :func:`labels_on_frames` returns.
LESION_BIT = 4
CONTENT_LABEL = "LUNGS_LESIONS"


def source_frames(sources: Sequence[Dataset]) -> list[SliceHeader]:
    """The frames of ``sources`` in SEG frame order: instance by instance, frame by frame."""
    frames = [h for ds in sources for h in slice_headers(ds)]
    if len(sources) > 1 and len(frames) != len(sources):
        raise ValueError("a SEG can reference one multi-frame instance or single-frame instances, not several "
                         "multi-frame instances")
    for i, h in enumerate(frames):
        if h.position is None or h.orientation is None or h.pixel_spacing is None:
            raise ValueError(f"source frame {i + 1} lacks ImagePositionPatient, ImageOrientationPatient or "
                             "PixelSpacing")
    return frames


def labels_on_frames(masks: StudyMasks, frames: Sequence[SliceHeader]) -> np.ndarray:
    """Per source frame and pixel: the lung label (0, right, left) plus LESION_BIT for lesions.

    Nearest-neighbour lookup of each source pixel centre in the scoring grid; pixels outside
    the grid are 0. Returns uint8 (frames, rows, columns).
    """
    code = masks.lung_labels.astype(np.uint8) | (masks.lesions.astype(np.uint8) * np.uint8(LESION_BIT))
    # Grid index -> LPS is origin + M @ index, M's columns the axis directions times spacings.
    grid_to_lps = np.column_stack([np.asarray(d, dtype=float) * s for d, s in zip(masks.direction, masks.spacing,
                                                                                     strict=True)])
    lps_to_grid = np.linalg.inv(grid_to_lps)
    origin = np.asarray(masks.origin, dtype=float)
    shape = np.asarray(code.shape)
    out = np.zeros((len(frames), frames[0].rows, frames[0].columns), dtype=np.uint8)
    for f, header in enumerate(frames):
        assert header.position is not None and header.orientation is not None and header.pixel_spacing is not None
        row_spacing, col_spacing = header.pixel_spacing
        along_row = np.asarray(header.orientation[:3]) * col_spacing  # one column to the right
        along_col = np.asarray(header.orientation[3:]) * row_spacing  # one row down
        start = lps_to_grid @ (np.asarray(header.position, dtype=float) - origin)
        per_col, per_row = lps_to_grid @ along_row, lps_to_grid @ along_col
        rows = np.arange(header.rows, dtype=float)[:, None]
        cols = np.arange(header.columns, dtype=float)[None, :]
        index = [np.rint(start[k] + rows * per_row[k] + cols * per_col[k]).astype(np.intp) for k in range(3)]
        inside = np.ones((header.rows, header.columns), dtype=bool)
        for k in range(3):
            inside &= (index[k] >= 0) & (index[k] < shape[k])
        out[f][inside] = code[index[0][inside], index[1][inside], index[2][inside]]
    return out


def _segments(scores: ExportScores) -> list[hd.seg.SegmentDescription]:
    algorithm = scores.algorithm_identification()

    def lung(number: int, name: str, side: Code, rgb: tuple[int, int, int]) -> hd.seg.SegmentDescription:
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=LUNG, algorithm_type="AUTOMATIC", algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*rgb),
        )
        # Laterality qualifies the property type (PS3.3 C.8.20.2.3, CID 244).
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(side)]
        return description

    return [
        lung(SEGMENT_RIGHT_LUNG, "Right lung", RIGHT, (80, 200, 255)),
        lung(SEGMENT_LEFT_LUNG, "Left lung", LEFT, (80, 255, 160)),
        hd.seg.SegmentDescription(
            segment_number=SEGMENT_LESIONS, segment_label="Lesions",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion, algorithm_type="AUTOMATIC",
            algorithm_identification=algorithm, anatomic_regions=[LUNG],
            display_color=hd.color.CIELabColor.from_rgb(255, 80, 40),
        ),
    ]


def lung_segmentation(sources: Sequence[Dataset], masks: StudyMasks, scores: ExportScores,
                      new: NewInstance) -> hd.seg.Segmentation:
    """A binary SEG of ``sources`` (headers suffice: pixel data is not read) with three segments:
    right lung, left lung (the patient's sides) and lesions. Frames with no segment are left out."""
    code = labels_on_frames(masks, source_frames(sources))
    lungs = code & np.uint8(3)
    pixels = np.stack([lungs == RIGHT_LUNG, lungs == LEFT_LUNG, (code & np.uint8(LESION_BIT)) > 0], axis=-1)
    seg = hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segments(scores),
        manufacturer_model_name=MODEL_NAME,
        software_versions=software_versions(scores),  # type: ignore[arg-type]  # LO, multi-valued
        device_serial_number="0",
        content_label=CONTENT_LABEL,
        content_description=f"Lungs and lesions, {scores.algorithm_name} {scores.model_version}"[:64],
        **new.identity(),
    )
    return label(seg, new, scores)
