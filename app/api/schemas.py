"""Response models of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, computed_field

from app.db.models import JobTrigger
from app.score_details import descriptors_of, flags_of, lower_bound_of


class Orm(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class FlagOut(BaseModel):
    """A reason not to take a scoring at face value (``code`` is a bounded set that may grow)."""

    code: str
    message: str
    #: The severity may under-read the disease: the band is floored at CT-3 (models.priority).
    lower_bound: bool = False


class LungDescriptorsOut(BaseModel):
    """One lung's lesion pattern; shares are of that lung's lesion volume (0..1), None without lesions."""

    lesion_volume_ml: float
    peripheral_share: float | None
    ground_glass_share: float | None
    consolidation_share: float | None
    foci: int


class DescriptorsOut(BaseModel):
    right: LungDescriptorsOut
    left: LungDescriptorsOut
    bilateral: bool


class WorklistItem(Orm):
    study_uid: str
    accession_number: str | None
    study_date: str | None
    study_description: str | None
    patient_age: str | None
    #: Shown to radiologists; never logged or in error bodies.
    patient_name: str | None = None
    patient_id: str | None = None
    modality: str | None = None
    state: str
    reason: str | None
    #: The error class behind ``reason`` (rejected and failed studies).
    reason_code: str | None = None
    first_received_at: datetime
    last_received_at: datetime
    scored_at: datetime | None
    instance_count: int
    identification: float | None
    severity: float | None
    severity_left: float | None
    severity_right: float | None
    severity_band: int | None
    priority: float | None
    method: str | None
    model_version: str | None
    #: The current scoring's flags; with ``severity_lower_bound`` the band shown is floored at CT-3.
    flags: list[FlagOut]
    severity_lower_bound: bool
    #: "Open in viewer" link (CTTRIAGE_VIEWER_URL_TEMPLATE); None without a template.
    viewer_url: str | None = None
    # The current scoring against the patient's prior study (app.priors): None without a prior,
    # when prior_reason says why.
    prior_study_uid: str | None = None
    prior_study_date: str | None = None
    prior_days: int | None = None
    #: Max-lung severity now minus at the prior, in points.
    severity_change: float | None = None
    prior_reason: str | None = None
    #: "worse" or "better" by at least CTTRIAGE_TREND_POINTS, else "unchanged"; None without a prior.
    trend: Literal["worse", "better", "unchanged"] | None = None


class Worklist(BaseModel):
    items: list[WorklistItem]
    total: int
    limit: int
    offset: int


class SeriesOut(Orm):
    series_uid: str
    series_number: int | None
    modality: str | None
    description: str | None
    instance_count: int
    chosen: bool
    skip_reason: str | None
    slice_count: int | None
    slice_spacing_mm: float | None


class JobOut(Orm):
    id: int
    study_version: int
    state: str
    trigger: str
    attempts: int
    error: str | None
    worker: str | None
    created_at: datetime
    enqueued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    timings: dict[str, Any]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def trigger_description(self) -> str:
        """Which rule queued the job, in words (the study page shows it)."""
        try:
            return JobTrigger(self.trigger).description
        except ValueError:  # a trigger this version does not know
            return self.trigger


class ResultOut(Orm):
    id: int
    job_id: int
    study_version: int
    series_uid: str
    method: str
    model_version: str
    identification: float | None
    severity: float
    severity_left: float
    severity_right: float
    lung_volume_left_ml: float
    lung_volume_right_ml: float
    lesion_volume_left_ml: float
    lesion_volume_right_ml: float
    timings: dict[str, Any]
    details: dict[str, Any]
    created_at: datetime
    # This scoring against the patient's prior study (app.priors); changes are now minus prior.
    prior_result_id: int | None = None
    prior_study_uid: str | None = None
    prior_study_date: str | None = None
    prior_days: int | None = None
    severity_change: float | None = None
    severity_left_change: float | None = None
    severity_right_change: float | None = None
    lesion_volume_change_ml: float | None = None
    prior_reason: str | None = None

    # This scoring's own flags and descriptors, read from its details (older results: none).
    @computed_field  # type: ignore[prop-decorator]
    @property
    def flags(self) -> list[FlagOut]:
        return [FlagOut(**f) for f in flags_of(self.details)]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def severity_lower_bound(self) -> bool:
        return lower_bound_of(self.details)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def descriptors(self) -> DescriptorsOut | None:
        found = descriptors_of(self.details)
        return DescriptorsOut.model_validate(found) if found is not None else None


class ExportOut(Orm):
    """One object sent back to the PACS for a result, with its last attempt's outcome."""

    id: int
    result_id: int
    kind: str
    sop_instance_uid: str
    state: str
    attempts: int
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None


class StudyDetail(WorklistItem):
    version: int
    chosen_series_uid: str | None
    series: list[SeriesOut]
    jobs: list[JobOut]
    results: list[ResultOut]
    exports: list[ExportOut]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def descriptors(self) -> DescriptorsOut | None:
        """The current scoring's descriptors: the result whose scores the study shows (written
        with the same time as ``scored_at``; a late result of an outdated version is history only)."""
        current = [r for r in self.results if self.scored_at is not None and r.created_at == self.scored_at]
        return current[-1].descriptors if current else None


class PatientStudyOut(Orm):
    """One scored study of a patient: its scores and its change since the prior."""

    study_uid: str
    accession_number: str | None
    study_date: str | None
    issuer_of_patient_id: str | None
    scored_at: datetime | None
    severity: float | None
    severity_left: float | None
    severity_right: float | None
    severity_band: int | None
    identification: float | None
    severity_lower_bound: bool
    prior_study_uid: str | None
    prior_days: int | None
    severity_change: float | None
    prior_reason: str | None
    trend: Literal["worse", "better", "unchanged"] | None = None


class PatientStudies(BaseModel):
    """A patient's scored studies, oldest first: the scores over time."""

    patient_id: str
    studies: list[PatientStudyOut]


class UploadedFile(BaseModel):
    """One uploaded file (or zip member): ``status`` says what became of it, ``error`` why not stored."""

    filename: str | None
    stored: bool
    status: Literal["stored", "duplicate", "quarantined", "refused"] = "stored"
    study_uid: str | None = None
    sop_instance_uid: str | None = None
    duplicate: bool = False
    error: str | None = None


class UploadReport(BaseModel):
    stored: int  # duplicates included
    rejected: int  # quarantined or refused
    duplicates: int = 0
    quarantined: int = 0
    files: list[UploadedFile]


class QuarantinedOut(Orm):
    id: int
    original_name: str | None
    size_bytes: int
    reason: str
    source: str
    calling_aet: str | None
    received_at: datetime


class RescoreAccepted(BaseModel):
    study_uid: str
    job_id: int
    enqueued: bool
