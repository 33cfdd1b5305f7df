"""What the three DICOM objects sent back to the PACS share: who made them, which new series
they start, the scores they carry, and the codes they use.

The writers (:mod:`worker.export_sr`, :mod:`worker.export_seg`, :mod:`worker.export_sc`) are
pure: source headers, masks or pictures and an :class:`ExportScores` in, a pydicom Dataset out.
UIDs come from the caller (the ``exports`` row), so a retried export rebuilds the very same
instance and a PACS that already has it keeps one copy.

Codes. Standard codes wherever one means what we report:

- anatomy: SCT 39607008 "Lung" with laterality SCT 24028007 "Right" / SCT 7771000 "Left";
  lesions: SCT 52988006 "Lesion" (category SCT 49755003 "Morphologically Abnormal Structure"),
  lungs in category SCT 91723000 "Anatomical Structure";
- volumes: SCT 118565006 "Volume" in UCUM "ml"; percentages in UCUM "%"; the worse lung's
  percentage carries derivation SCT 56851009 "Maximum";
- method (CID 7162 algorithm families): the threshold method is DCM 123104 "Morphological
  Operations" (HU thresholds, connected components, distance transforms), the networks DCM 123110
  "Artificial Intelligence"; the algorithm name ("cttriage threshold", or the network's
  architecture) and version (the model version) identify it exactly;
- procedure reported: LN 25045-6 "CT unspecified body region" (CID 100).

No standard code says "percent of a lung's volume affected by lesions" or "probability of
COVID-19", so those two use the private coding scheme ``99CTTRIAGE`` (DICOM PS3.3 8.2: designators
beginning with "99" are private), declared in each SR's CodingSchemeIdentificationSequence:

- 99CTTRIAGE CTT001 "Percent of lung volume affected" (UCUM "%", 0..100);
- 99CTTRIAGE CTT002 "Probability of COVID-19" (UCUM "1", 0..1; absent when not estimated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from app import __version__
from app.db.models import ExportKind
from models.severity import LungSeverity

MANUFACTURER = "cttriage"
MODEL_NAME = "cttriage chest CT triage"
METHOD_THRESHOLD = "threshold"

#: Per kind: series number and description of the new series.
SERIES = {
    ExportKind.sr: (9901, "cttriage scores"),
    ExportKind.seg: (9902, "cttriage lungs+lesions"),
    ExportKind.sc: (9903, "cttriage projection"),
}

PRIVATE_SCHEME = "99CTTRIAGE"
PRIVATE_SCHEME_ITEM = hd.coding_schemes.CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME, name="cttriage local codes", responsible_organization=MANUFACTURER,
)
PERCENT_AFFECTED = hd.sr.CodedConcept("CTT001", PRIVATE_SCHEME, "Percent of lung volume affected")
COVID_PROBABILITY = hd.sr.CodedConcept("CTT002", PRIVATE_SCHEME, "Probability of COVID-19")
MILLILITER = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
LUNG = codes.SCT.Lung
RIGHT, LEFT = codes.SCT.Right, codes.SCT.Left


@dataclass(frozen=True)
class ExportScores:
    """The scores of one result, as the writers need them."""

    series_uid: str  # the scored series
    method: str
    model_version: str
    identification: float | None
    lungs: LungSeverity

    @classmethod
    def of(cls, result: Any) -> ExportScores:
        """From anything with these attributes and LungSeverity's (a ``Result`` row)."""
        lungs = LungSeverity(**{name: getattr(result, name) for name in LungSeverity.__dataclass_fields__})
        return cls(result.series_uid, result.method, result.model_version, result.identification, lungs)

    @property
    def is_threshold(self) -> bool:
        return self.method == METHOD_THRESHOLD

    @property
    def algorithm_name(self) -> str:
        return f"cttriage {self.method}"

    @property
    def algorithm_family(self) -> hd.sr.CodedConcept:
        family = codes.DCM.MorphologicalOperations if self.is_threshold else codes.DCM.ArtificialIntelligence
        return hd.sr.CodedConcept.from_code(family)

    def algorithm_identification(self) -> hd.AlgorithmIdentificationSequence:
        """For SEG segments (Algorithm Identification macro)."""
        return hd.AlgorithmIdentificationSequence(name=self.algorithm_name, family=self.algorithm_family,
                                                  version=self.model_version)


@dataclass(frozen=True)
class NewInstance:
    """The UIDs and series labels of one object we create."""

    kind: ExportKind
    sop_instance_uid: str

    @property
    def series_instance_uid(self) -> str:
        """One new series per object, derived from its SOP instance UID (stable across retries)."""
        return str(generate_uid(entropy_srcs=[self.sop_instance_uid, "series"]))

    @property
    def series_number(self) -> int:
        return SERIES[self.kind][0]

    @property
    def series_description(self) -> str:
        return SERIES[self.kind][1]

    def identity(self) -> dict[str, Any]:
        """The highdicom constructor arguments that name the instance, its series and maker."""
        return {"series_instance_uid": self.series_instance_uid, "series_number": self.series_number,
                "sop_instance_uid": self.sop_instance_uid, "instance_number": 1, "manufacturer": MANUFACTURER}


def software_versions(scores: ExportScores) -> list[str]:
    return [f"cttriage {__version__}", scores.model_version]


def label(ds: Dataset, new: NewInstance, scores: ExportScores) -> Dataset:
    """The series labels and equipment every exported object carries; returns ``ds``."""
    ds.SeriesDescription = new.series_description
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = software_versions(scores)
    return ds
