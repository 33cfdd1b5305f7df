"""Each study compared with the patient's prior: the most recent earlier study cttriage scored.

The prior of a study is the scored study of the same Patient ID and Issuer of Patient ID with the
latest study date before this one's. A differing birth date or sex (both known on both studies)
means the ID was reused for another person: that candidate is never the prior, and when no other
candidate is left the study says so in ``prior_reason``. Studies of one day are not compared
(without the study time, which one came first is a guess).

:func:`compare_with_prior` is called once where a result is saved
(``app.lifecycle.finish_scored``), in its transaction. It compares that study with its prior,
and the patient's later studies with theirs: a prior retrieved and scored after the new study
fills in the new study's comparison then, while scoring a later study never changes an earlier
one's. Only the newest result of each study is (re)written, and the study row only while that
result is the one it shows. A study left without a prior may have one looked for on the PACS
(``app.prior_lookups``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import date, datetime
from typing import Literal

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from app.db.models import Result, Study, StudyState
from app.prior_lookups import request_lookup
from app.settings import Settings
from models.priority import priority_score

Trend = Literal["worse", "better", "unchanged"]


@dataclass(frozen=True)
class Comparison:
    """One study against its prior: the changes are this study minus the prior (points, mL)."""

    prior_result_id: int | None = None
    prior_study_uid: str | None = None
    prior_study_date: str | None = None
    prior_days: int | None = None
    severity_change: float | None = None
    severity_left_change: float | None = None
    severity_right_change: float | None = None
    lesion_volume_change_ml: float | None = None
    prior_reason: str | None = None


#: The comparison columns the study row carries for the worklist (the result carries them all).
STUDY_COLUMNS = ("prior_study_uid", "prior_study_date", "prior_days", "severity_change", "prior_reason")


def trend(severity_change: float | None, points: float) -> Trend | None:
    """Worse or better by at least ``points`` (CTTRIAGE_TREND_POINTS), else unchanged; None
    without a prior. The one place that decides the trend column and the worsening rule."""
    if severity_change is None:
        return None
    if severity_change >= points:
        return "worse"
    if severity_change <= -points:
        return "better"
    return "unchanged"


def study_day(value: str | None) -> date | None:
    """A DICOM DA (YYYYMMDD) as a date; None when absent or not a date."""
    try:
        return datetime.strptime(value or "", "%Y%m%d").date()
    except ValueError:
        return None


def _newest_result(session: Session, study_id: int) -> Result | None:
    return session.execute(
        select(Result).where(Result.study_id == study_id).order_by(Result.id.desc()).limit(1)
    ).scalar_one_or_none()


def _same_patient_scored(session: Session, study: Study) -> Sequence[Study]:
    """Other scored studies with this Patient ID (any issuer), newest study date first."""
    return session.execute(
        select(Study).where(Study.patient_id == study.patient_id, Study.id != study.id,
                            Study.state == StudyState.scored.value, Study.study_date.is_not(None))
        .order_by(Study.study_date.desc(), Study.id.desc())
    ).scalars().all()


def _mismatch(study: Study, other: Study) -> str | None:
    """Why ``other`` is another person despite the same Patient ID; None when nothing says so."""
    if (study.issuer_of_patient_id or "") != (other.issuer_of_patient_id or ""):
        return "same patient ID, different issuer of patient ID"
    if study.patient_birth_date and other.patient_birth_date and study.patient_birth_date != other.patient_birth_date:
        return "same patient ID, different birth date"
    if study.patient_sex and other.patient_sex and study.patient_sex != other.patient_sex:
        return "same patient ID, different sex"
    return None


def find_comparison(session: Session, study: Study, result: Result) -> Comparison:
    """``result`` (of ``study``) against the newest result of the study's prior, or the reason
    there is none."""
    if not study.patient_id:
        return Comparison(prior_reason="no patient ID")
    day = study_day(study.study_date)
    if day is None:
        return Comparison(prior_reason="no study date")
    blocked: str | None = None
    for other in _same_patient_scored(session, study):
        other_day = study_day(other.study_date)
        if other_day is None or other_day >= day:
            continue
        reason = _mismatch(study, other)
        if reason is not None:
            blocked = blocked or reason
            continue
        prior = _newest_result(session, other.id)
        if prior is None:
            continue
        return Comparison(
            prior_result_id=prior.id, prior_study_uid=other.study_uid, prior_study_date=other.study_date,
            prior_days=(day - other_day).days,
            severity_change=round(result.severity - prior.severity, 2),
            severity_left_change=round(result.severity_left - prior.severity_left, 2),
            severity_right_change=round(result.severity_right - prior.severity_right, 2),
            lesion_volume_change_ml=round(result.lesion_volume_left_ml + result.lesion_volume_right_ml
                                          - prior.lesion_volume_left_ml - prior.lesion_volume_right_ml, 1),
        )
    return Comparison(prior_reason=blocked or "no earlier study of this patient scored")


def _write_comparison(session: Session, study: Study, settings: Settings) -> Comparison | None:
    """Compare the study's newest result with its prior; the study row too while it shows that
    result, with the priority's worsening rule applied."""
    result = _newest_result(session, study.id)
    if result is None:
        return None
    comparison = find_comparison(session, study, result)
    values = asdict(comparison)
    session.execute(update(Result).where(Result.id == result.id).values(**values))
    if study.state != StudyState.scored.value or study.scored_at != result.created_at or study.severity is None:
        return comparison
    worsening = (settings.priority_worsening_first
                 and trend(comparison.severity_change, settings.trend_points) == "worse")
    priority = priority_score(study.severity, study.identification, settings.severity_band_edges,
                              lower_bound=study.severity_lower_bound, worsening=worsening)
    session.execute(update(Study).where(Study.id == study.id, Study.scored_at == result.created_at)
                    .values(priority=priority, **{name: values[name] for name in STUDY_COLUMNS}))
    return comparison


def compare_with_prior(session: Session, study_id: int, settings: Settings) -> None:
    """Compare the study whose result was just saved with its prior, and the patient's later
    studies with theirs (this study may be their prior now). Runs in the caller's transaction."""
    session.flush()
    study = session.execute(
        select(Study).where(Study.id == study_id).execution_options(populate_existing=True)
    ).scalar_one()
    if study.patient_id and session.get_bind().dialect.name == "postgresql":
        # One patient's scorings compare one after the other: two studies scored at once would
        # each miss the other's uncommitted result. Held until the result's transaction ends.
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:patient))"), {"patient": study.patient_id})
    comparison = _write_comparison(session, study, settings)
    if comparison is not None and comparison.prior_study_uid is None:
        request_lookup(session, study, settings)  # the PACS may hold one (CTTRIAGE_PRIORS_*)
    day = study_day(study.study_date)
    if not study.patient_id or day is None:
        return
    for later in _same_patient_scored(session, study):
        later_day = study_day(later.study_date)
        if later_day is not None and later_day > day:
            _write_comparison(session, later, settings)


def patient_studies(session: Session, patient_id: str) -> Sequence[Study]:
    """The patient's scored studies, oldest first: the scores over time."""
    return session.execute(
        select(Study).where(Study.patient_id == patient_id, Study.state == StudyState.scored.value)
        .order_by(func.coalesce(Study.study_date, ""), Study.first_received_at, Study.id)
    ).scalars().all()
