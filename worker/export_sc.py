"""Secondary capture of the frontal projection picture (lesion share along each ray in colour),
so a reading room without our web page sees it beside the images."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from worker.export_common import ExportScores, NewInstance, label

#: :func:`models.rendering.projection_overlay`'s layout: patient's right on the image's left
#: (columns run towards the patient's left), superior at the top (rows run towards the feet).
PROJECTION_ORIENTATION = ("L", "F")


def projection_capture(source: Dataset, picture: np.ndarray, scores: ExportScores, new: NewInstance,
                       pixel_spacing_mm: float | None = None) -> hd.sc.SCImage:
    """An RGB Secondary Capture Image of ``picture`` (uint8, rows x columns x 3) in the study of
    ``source`` (patient and study modules copied from it). ``pixel_spacing_mm``: the picture's
    square pixel size in the patient, where known."""
    if picture.ndim != 3 or picture.shape[2] != 3 or picture.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 picture, got {picture.dtype} {picture.shape}")
    spacing = (pixel_spacing_mm, pixel_spacing_mm) if pixel_spacing_mm else None
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(picture),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        pixel_spacing=spacing,  # type: ignore[arg-type]
        patient_orientation=PROJECTION_ORIENTATION,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        **new.identity(),
    )
    sc.copy_patient_and_study_information(source)  # the whole modules, not only the basics
    sc.ConversionType = "WSD"  # made by a workstation (software), not digitised from a device
    # An unpaired body part: General Series' Laterality (type 2C, paired parts only) stays absent.
    sc.BodyPartExamined = source.get("BodyPartExamined") or "CHEST"
    sc.BurnedInAnnotation = "NO"
    sc.DerivationDescription = (f"Frontal projection of the scored series with the lesion share along each ray "
                                f"in colour ({scores.algorithm_name} {scores.model_version})")[:1024]
    return label(sc, new, scores)
