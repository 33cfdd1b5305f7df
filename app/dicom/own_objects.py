"""Recognising what cttriage itself sent to the PACS, and instances that cannot change a scoring.

A PACS routing rule that forwards a whole study on change sends our own SR, SEG and secondary
capture back with the CT. Were they new instances like any other, each would reopen the study,
the same CT would be scored again and three more objects sent: a loop without end. So the one
predicate here says what we made (our Manufacturer and model name on one of the three SOP
classes we write, see ``worker.export_common``), and ingest lets only instances that could
change which series is scored, or its pixels, reopen a study.
"""

from __future__ import annotations

from typing import Literal

from pydicom import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage, SegmentationStorage

#: Written into every exported object (``worker.export_common.label``).
MANUFACTURER = "cttriage"
MODEL_NAME = "cttriage chest CT triage"

#: The SOP classes we export, by the short name used in reasons.
OWN_SOP_CLASSES: dict[str, str] = {
    Comprehensive3DSRStorage: "SR", SegmentationStorage: "SEG", SecondaryCaptureImageStorage: "SC"}

#: What to do with our own objects when a PACS sends them back (``CTTRIAGE_OWN_OBJECTS``).
OwnObjectsPolicy = Literal["store", "drop"]

#: Series selection scores CT only (``app.series_selection``).
SCORED_MODALITY = "CT"


def created_by_cttriage(ds: Dataset) -> str | None:
    """The kind ("SR", "SEG", "SC") of an object cttriage wrote, or None for anything else.

    Manufacturer and model name together, on one of our SOP classes: a scanner's own SR or
    secondary capture never carries both (the UIDs come from pydicom's root, shared by others).
    """
    kind = OWN_SOP_CLASSES.get(str(ds.get("SOPClassUID", "")))
    if kind is None:
        return None
    if str(ds.get("Manufacturer", "")) != MANUFACTURER or str(ds.get("ManufacturerModelName", "")) != MODEL_NAME:
        return None
    return kind


def own_object_reason(kind: str) -> str:
    """The series list's reason for a series of ours."""
    return f"created by cttriage ({kind})"


def never_scored_reason(modality: str | None, created_by: str | None) -> str | None:
    """Why a series of such instances can never be the scored one (None: it may be).

    Such instances cannot change a scoring, so they never reopen a study.
    """
    if created_by is not None:
        return own_object_reason(created_by)
    if modality != SCORED_MODALITY:
        return f"modality {modality or 'missing'} is not {SCORED_MODALITY}"
    return None
