"""DICOM Structured Report of a scoring: a TID 1500 Measurement Report (Comprehensive 3D SR).

Measurement groups, each with the method (CID 7162 family) and the algorithm (name, model
version) that produced it:

- per lung (right, left; finding site Lung + laterality): lung volume (mL) and percent of lung
  volume affected (%); referencing that lung's SEG segment (TID 1411) when a SEG is exported;
- per lung: the lesions' volume (mL) (finding type Lesion) and, where the scoring described
  them, their pattern: peripheral, ground-glass and consolidation shares (%) and number of foci;
- the study: max-lung severity (percent affected, derivation Maximum) and the probability of
  COVID-19 (0..1), the latter only when the method estimates it (never for "threshold"); whether
  the severity is a lower bound (Yes/No), each quality flag (its code, with its message as a TEXT
  child) and, with descriptors, whether the lesions are bilateral (Yes/No);
- with a prior study matched (``app.priors``): the comparison, referencing the prior by its Study
  Instance UID, with the changes of severity (max-lung and per lung, in points), lesion volume and
  the days between.

The codes are listed and justified in :mod:`worker.export_common`. Every source instance is
listed as evidence (CurrentRequestedProcedureEvidenceSequence). TID 1500's Image Library is
left out on purpose: nothing here references single images (the groups reference the SEG,
which references the series), and a library entry per slice (about 12 content items each)
made a 300-slice report 1.2 MB and 15 s of work, and put 3,600 lines ahead of the scores in
a PACS's SR view.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage, generate_uid

from models.findings import LungDescriptors, ScoreFlag
from worker.export_common import (
    BILATERAL_LESIONS,
    CONSOLIDATION_SHARE,
    COVID_PROBABILITY,
    DAY,
    GROUND_GLASS_SHARE,
    LEFT,
    LESION_FOCI,
    LESION_VOLUME_CHANGE,
    LUNG,
    MANUFACTURER,
    MILLILITER,
    MODEL_NAME,
    PERCENT_AFFECTED,
    PERIPHERAL_SHARE,
    PRIVATE_SCHEME_ITEM,
    QUALITY_FLAG,
    QUALITY_FLAG_REASON,
    RIGHT,
    SEVERITY_CHANGE,
    SEVERITY_LOWER_BOUND,
    TIME_SINCE_PRIOR,
    ExportScores,
    NewInstance,
    Predecessor,
    PriorChange,
    flag_concept,
    label,
)
from worker.export_seg import SEGMENT_LEFT_LUNG, SEGMENT_RIGHT_LUNG

#: The observer: this software, the same UID on every installation and version.
DEVICE_OBSERVER_UID = str(generate_uid(entropy_srcs=["cttriage", "device observer"]))
PROCEDURE_REPORTED = codes.LN.CTUnspecifiedBodyRegion


def _stub(study_uid: str, series_uid: str, sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    """What highdicom needs to know of an instance this report references (the SEG as evidence,
    an earlier report as predecessor): where it is and what it is, no content."""
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    return ds


Group = hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
#: A coded name or unit as highdicom takes it: its own CodedConcept or pydicom's Code.
Concept = hd.sr.CodedConcept | Code


def _yes_no(name: hd.sr.CodedConcept, value: bool) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(name, codes.SCT.Yes if value else codes.SCT.No)


def _flag(flag: ScoreFlag) -> hd.sr.QualitativeEvaluation:
    """The flag's code as the value, its message as a TEXT property of it."""
    evaluation = hd.sr.QualitativeEvaluation(QUALITY_FLAG, flag_concept(flag.code))
    evaluation[0].ContentSequence = [hd.sr.TextContentItem(
        name=QUALITY_FLAG_REASON, value=flag.message,
        relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES)]
    return evaluation


def _pattern(lung: LungDescriptors | None) -> list[tuple[hd.sr.CodedConcept, float, Code]]:
    """A lung's lesion pattern as (concept, value, unit); shares as percentages, none without lesions."""
    if lung is None:
        return []
    shares = ((PERIPHERAL_SHARE, lung.peripheral_share), (GROUND_GLASS_SHARE, lung.ground_glass_share),
              (CONSOLIDATION_SHARE, lung.consolidation_share))
    return [*((name, 100.0 * share, codes.UCUM.Percent) for name, share in shares if share is not None),
            (LESION_FOCI, float(lung.foci), codes.UCUM.NoUnits)]


def _groups(scores: ExportScores, new: NewInstance, segmentation: NewInstance | None) -> list[Group]:
    method = scores.algorithm_family
    algorithm = hd.sr.AlgorithmIdentification(name=scores.algorithm_name, version=scores.model_version)

    def tracking(name: str) -> hd.sr.TrackingIdentifier:
        return hd.sr.TrackingIdentifier(uid=str(generate_uid(entropy_srcs=[new.sop_instance_uid, name])),
                                        identifier=name)

    def measurement(name: Concept, value: float, unit: Concept, *, derivation: Concept | None = None,
                    finding_sites: Sequence[hd.sr.FindingSite] | None = None) -> hd.sr.Measurement:
        return hd.sr.Measurement(name=name, value=round(float(value), 4), unit=unit, derivation=derivation,
                                 finding_sites=finding_sites)

    groups: list[Group] = []
    lungs = scores.lungs
    described = scores.descriptors
    for side, side_name, segment, lung_ml, percent, lesion_ml, pattern in (
        (RIGHT, "right", SEGMENT_RIGHT_LUNG, lungs.lung_volume_right_ml, lungs.severity_right,
         lungs.lesion_volume_right_ml, described.right if described else None),
        (LEFT, "left", SEGMENT_LEFT_LUNG, lungs.lung_volume_left_ml, lungs.severity_left, lungs.lesion_volume_left_ml,
         described.left if described else None),
    ):
        site = [hd.sr.FindingSite(anatomic_location=LUNG, laterality=side)]
        lung_measurements = [
            measurement(codes.SCT.Volume, lung_ml, MILLILITER),
            measurement(PERCENT_AFFECTED, percent, codes.UCUM.Percent),
        ]
        if segmentation is not None:
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking(f"{side_name} lung"),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=SegmentationStorage, sop_instance_uid=segmentation.sop_instance_uid,
                    segment_number=segment,
                    source_series=hd.sr.SourceSeriesForSegmentation(scores.series_uid)),
                measurements=lung_measurements, method=method, algorithm_id=algorithm, finding_sites=site))
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking(f"{side_name} lung"), measurements=lung_measurements,
                method=method, algorithm_id=algorithm, finding_sites=site))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking(f"{side_name} lung lesions"), finding_type=codes.SCT.Lesion,
            measurements=[measurement(codes.SCT.Volume, lesion_ml, MILLILITER),
                          *(measurement(name, value, unit) for name, value, unit in _pattern(pattern))],
            method=method, algorithm_id=algorithm, finding_sites=site))

    study_measurements = [measurement(PERCENT_AFFECTED, lungs.severity, codes.UCUM.Percent,
                                      derivation=codes.SCT.Maximum,
                                      finding_sites=[hd.sr.FindingSite(anatomic_location=LUNG)])]
    if scores.identification is not None:
        study_measurements.append(measurement(COVID_PROBABILITY, scores.identification, codes.UCUM.NoUnits))
    # No finding type here: "Finding: COVID-19" would read as a diagnosis, even from the threshold
    # method that does not estimate it; the probability's concept name says what it is about.
    evaluations = [_yes_no(SEVERITY_LOWER_BOUND, scores.severity_lower_bound), *map(_flag, scores.flags)]
    if described is not None:
        evaluations.append(_yes_no(BILATERAL_LESIONS, described.bilateral))
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking("study"), method=method, algorithm_id=algorithm, measurements=study_measurements,
        qualitative_evaluations=evaluations))
    if scores.prior is not None:
        groups.append(_comparison(scores.prior, tracking("comparison with prior"), method, algorithm))
    return groups


def _comparison(prior: PriorChange, tracking: hd.sr.TrackingIdentifier, method: hd.sr.CodedConcept,
                algorithm: hd.sr.AlgorithmIdentification) -> Group:
    """The changes since the prior study, and which study that was (a UIDREF child)."""
    def change(value: float, unit: Concept, name: Concept = SEVERITY_CHANGE, *, derivation: Concept | None = None,
               finding_sites: Sequence[hd.sr.FindingSite] | None = None) -> hd.sr.Measurement:
        return hd.sr.Measurement(name=name, value=round(float(value), 4), unit=unit, derivation=derivation,
                                 finding_sites=finding_sites)

    measurements = [
        change(prior.severity_change, codes.UCUM.Percent, derivation=codes.SCT.Maximum,
               finding_sites=[hd.sr.FindingSite(anatomic_location=LUNG)]),
        change(prior.severity_right_change, codes.UCUM.Percent,
               finding_sites=[hd.sr.FindingSite(anatomic_location=LUNG, laterality=RIGHT)]),
        change(prior.severity_left_change, codes.UCUM.Percent,
               finding_sites=[hd.sr.FindingSite(anatomic_location=LUNG, laterality=LEFT)]),
        change(prior.lesion_volume_change_ml, MILLILITER, LESION_VOLUME_CHANGE),
        change(prior.prior_days, DAY, TIME_SINCE_PRIOR),
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, method=method, algorithm_id=algorithm, measurements=measurements)
    group[0].ContentSequence.append(hd.sr.UIDRefContentItem(
        name=codes.DCM.StudyInstanceUID, value=prior.prior_study_uid,
        relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES))
    return group


def measurement_report(sources: Sequence[Dataset], scores: ExportScores, new: NewInstance,
                       segmentation: NewInstance | None = None,
                       predecessor: Predecessor | None = None) -> hd.sr.Comprehensive3DSR:
    """The scores of one result as a Measurement Report on ``sources`` (the scored series'
    instances; headers suffice). ``segmentation`` names the SEG exported beside it, whose lung
    segments the per-lung groups then reference. ``predecessor``: the report of an earlier scoring
    of the study that this one amends (a study sent in parts, a rescore), so a reader sees which
    report counts."""
    if not sources:
        raise ValueError("a measurement report needs the source instances")
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_OBSERVER_UID, name=MANUFACTURER, manufacturer_name=MANUFACTURER, model_name=MODEL_NAME),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=_groups(scores, new, segmentation),
    )
    evidence = list(sources)
    if segmentation is not None:
        evidence.append(_stub(str(sources[0].StudyInstanceUID), segmentation.series_instance_uid,
                              SegmentationStorage, segmentation.sop_instance_uid))
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        is_complete=True,
        is_final=True,
        coding_schemes=[PRIVATE_SCHEME_ITEM],
        previous_versions=None if predecessor is None else [_stub(
            predecessor.study_uid, predecessor.series_uid, predecessor.sop_class_uid, predecessor.sop_instance_uid)],
        **new.identity(),
    )
    return label(sr, new, scores)
