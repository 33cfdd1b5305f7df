"""What the three DICOM objects sent back to the PACS share: who made them, which series they
go in (one per kind and study, every scoring of the study amending the last), the scores they
carry, and the codes they use.

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

Quality flags and lesion descriptors (``models.findings``) have no standard codes either:

- 99CTTRIAGE CTT003 "Scoring quality flag": a qualitative evaluation of the study group, one per
  flag; its value is the flag's own code in this scheme (e.g. ``LungMaskImplausible``; codes over
  16 characters go in LongCodeValue), with the flag's message as a TEXT child, 99CTTRIAGE CTT004
  "Quality flag reason" (HAS PROPERTIES). Any flag code is written this way, known or new;
- 99CTTRIAGE CTT005 "Severity is a lower bound": SCT 373066001 "Yes" / SCT 373067005 "No", always
  in the study group (Yes: the worklist ranks the study at least CT-3);
- per lung, in its lesions group: CTT006 "Peripheral share of lesion volume", CTT007 "Ground-glass
  share of lesion volume", CTT008 "Consolidation share of lesion volume" (UCUM "%" of that lung's
  lesion volume; absent without lesions) and CTT009 "Number of lesion foci" (UCUM "1");
- CTT010 "Bilateral lesions": Yes / No in the study group (both lungs at least 1 % affected).

The comparison with the patient's prior study (``app.priors``), when one was matched, is its own
group (tracking identifier "comparison with prior"): the prior's Study Instance UID (DCM 110180,
UIDREF), CTT011 "Change in percent of lung volume affected since prior" (UCUM "%", in percentage
points: this study minus the prior; derivation Maximum for the worse lung, and once per lung with
its laterality), CTT012 "Change in lesion volume since prior" (ml, both lungs) and CTT013 "Time
since prior study" (UCUM "d", between the study dates).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeVar

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from app import __version__
from app.db.models import ExportKind
from app.dicom.own_objects import MANUFACTURER, MODEL_NAME
from app.score_details import descriptors_of, flags_of
from models.findings import LesionDescriptors, LungDescriptors, ScoreFlag, severity_is_lower_bound
from models.predictor import METHOD_THRESHOLD
from models.severity import LungSeverity

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
QUALITY_FLAG = hd.sr.CodedConcept("CTT003", PRIVATE_SCHEME, "Scoring quality flag")
QUALITY_FLAG_REASON = hd.sr.CodedConcept("CTT004", PRIVATE_SCHEME, "Quality flag reason")
SEVERITY_LOWER_BOUND = hd.sr.CodedConcept("CTT005", PRIVATE_SCHEME, "Severity is a lower bound")
PERIPHERAL_SHARE = hd.sr.CodedConcept("CTT006", PRIVATE_SCHEME, "Peripheral share of lesion volume")
GROUND_GLASS_SHARE = hd.sr.CodedConcept("CTT007", PRIVATE_SCHEME, "Ground-glass share of lesion volume")
CONSOLIDATION_SHARE = hd.sr.CodedConcept("CTT008", PRIVATE_SCHEME, "Consolidation share of lesion volume")
LESION_FOCI = hd.sr.CodedConcept("CTT009", PRIVATE_SCHEME, "Number of lesion foci")
BILATERAL_LESIONS = hd.sr.CodedConcept("CTT010", PRIVATE_SCHEME, "Bilateral lesions")
SEVERITY_CHANGE = hd.sr.CodedConcept("CTT011", PRIVATE_SCHEME, "Change in percent of lung volume affected since prior")
LESION_VOLUME_CHANGE = hd.sr.CodedConcept("CTT012", PRIVATE_SCHEME, "Change in lesion volume since prior")
TIME_SINCE_PRIOR = hd.sr.CodedConcept("CTT013", PRIVATE_SCHEME, "Time since prior study")
MILLILITER = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
DAY = hd.sr.CodedConcept("d", "UCUM", "day")
LUNG = codes.SCT.Lung
RIGHT, LEFT = codes.SCT.Right, codes.SCT.Left


@dataclass(frozen=True)
class PriorChange:
    """The scoring against the patient's prior study (``app.priors``): this minus the prior."""

    prior_study_uid: str
    prior_days: int
    severity_change: float
    severity_left_change: float
    severity_right_change: float
    lesion_volume_change_ml: float

    @classmethod
    def of(cls, result: Any) -> PriorChange | None:
        """From a ``Result`` row; None when it has no prior."""
        if getattr(result, "prior_study_uid", None) is None:
            return None
        return cls(**{name: getattr(result, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ExportScores:
    """The scores of one result, as the writers need them."""

    series_uid: str  # the scored series
    method: str
    model_version: str
    identification: float | None
    lungs: LungSeverity
    flags: tuple[ScoreFlag, ...] = ()
    descriptors: LesionDescriptors | None = None
    prior: PriorChange | None = None

    @classmethod
    def of(cls, result: Any) -> ExportScores:
        """From anything with these attributes and LungSeverity's (a ``Result`` row), flags and
        descriptors from its ``details``."""
        lungs = LungSeverity(**{name: getattr(result, name) for name in LungSeverity.__dataclass_fields__})
        flags = tuple(ScoreFlag(**f) for f in flags_of(result.details))
        found = descriptors_of(result.details)
        descriptors = None if found is None else LesionDescriptors(
            right=_lung_descriptors(found["right"]), left=_lung_descriptors(found["left"]),
            bilateral=bool(found.get("bilateral")))
        return cls(result.series_uid, result.method, result.model_version, result.identification, lungs, flags,
                   descriptors, PriorChange.of(result))

    @property
    def severity_lower_bound(self) -> bool:
        return severity_is_lower_bound(self.flags)

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


def _lung_descriptors(values: Any) -> LungDescriptors:
    return LungDescriptors(**{name: values.get(name) for name in LungDescriptors.__dataclass_fields__})


def flag_concept(code: str) -> hd.sr.CodedConcept:
    """A flag's code as a coded value in the private scheme; its meaning spelled out from the
    code ("LungMaskImplausible" -> "Lung mask implausible"), so any code, new ones too, reads."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", code).split(" ")
    meaning = " ".join([words[0], *(w.lower() if w[1:].islower() else w for w in words[1:])])
    return hd.sr.CodedConcept(code.replace("\\", "/"), PRIVATE_SCHEME, meaning[:64])


@dataclass(frozen=True)
class NewInstance:
    """The UIDs and series labels of one object we create.

    With ``study_uid``, the series is the study's own series of that kind, the same for every
    scoring of the study: a rescore's objects replace the earlier ones in it (higher
    ``instance_number``), so the PACS shows one current report and its history. Without (the
    writers on their own), each object starts a series of its own."""

    kind: ExportKind
    sop_instance_uid: str
    study_uid: str = ""
    instance_number: int = 1

    @property
    def series_instance_uid(self) -> str:
        """Derived, so stable across retries and rescores without storing it."""
        if self.study_uid:
            return study_series_uid(self.study_uid, self.kind)
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
                "sop_instance_uid": self.sop_instance_uid, "instance_number": self.instance_number,
                "manufacturer": MANUFACTURER}


def study_series_uid(study_uid: str, kind: ExportKind) -> str:
    """The one series of ``kind`` (SR, SEG, SC) that every scoring of ``study_uid`` is exported
    into: a hash of the study UID and the kind, so no table has to remember it."""
    return str(generate_uid(entropy_srcs=[study_uid, "cttriage export series", kind.value]))


@dataclass(frozen=True)
class Predecessor:
    """An earlier SR of the same study that a new one amends (Predecessor Documents Sequence)."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str


def software_versions(scores: ExportScores) -> list[str]:
    return [f"cttriage {__version__}", scores.model_version]


_D = TypeVar("_D", bound=Dataset)


def label(ds: _D, new: NewInstance, scores: ExportScores) -> _D:
    """The series labels and equipment every exported object carries; returns ``ds``."""
    ds.SeriesDescription = new.series_description
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = software_versions(scores)
    return ds
