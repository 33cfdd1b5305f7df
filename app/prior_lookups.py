"""Priors from the PACS (``CTTRIAGE_PRIORS_*``, off by default): a study scored without a prior
gets a lookup row (:func:`request_lookup`, from ``app.priors`` in the result's transaction); a
thread of the DICOM process (:func:`run_prior_lookups`) takes pending rows one at a time, finds
the patient's most recent earlier CT study on the query/retrieve node (C-FIND, Study Root:
Patient ID, Issuer, ModalitiesInStudy CT, StudyDate within ``priors_days_back``) and has it sent
to our own AE (C-MOVE). The prior arrives like any study, is scored after new studies
(``app.priority``), and its scoring fills in the new study's comparison (``app.priors``).

Every outcome stays on the row with its reason (the admin page lists them); nothing here holds
up a study's own scoring, and a retrieved prior never looks for a prior of its own.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, exists, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import PriorLookup, PriorLookupState, Study, utcnow
from app.dicom.query_retrieve import QueryNode, QueryRetrieveError, find_ct_studies, move_study
from app.settings import Settings

log = logging.getLogger(__name__)


def request_lookup(session: Session, study: Study, settings: Settings) -> None:
    """Queue a lookup of the study's prior, unless it has one, priors are off, or the study is
    itself a retrieved prior (one generation back, never a chain)."""
    if not settings.priors_enabled or not study.patient_id or not study.study_date:
        return
    known = session.execute(select(func.count()).select_from(PriorLookup).where(
        (PriorLookup.study_id == study.id) | (PriorLookup.prior_study_uid == study.study_uid))).scalar_one()
    if not known:
        session.add(PriorLookup(study_id=study.id, state=PriorLookupState.pending.value, created_at=utcnow()))


def retrieved_as_prior() -> Any:
    """A column expression: the study was retrieved as another study's prior (its job waits)."""
    return exists().where(PriorLookup.prior_study_uid == Study.study_uid).label("retrieved_prior")


def query_node(settings: Settings) -> QueryNode:
    return QueryNode(host=settings.priors_host or "", port=settings.priors_port, called_aet=settings.priors_ae_title,
                     calling_aet=settings.priors_calling_aet, timeout_seconds=settings.priors_timeout_seconds)


def _finish(session_factory: sessionmaker[Session], lookup_id: int, state: PriorLookupState, reason: str,
            prior_study_uid: str | None = None) -> None:
    with session_factory.begin() as session:
        values = {"state": state.value, "reason": reason, "finished_at": utcnow()}
        if prior_study_uid is not None:
            values["prior_study_uid"] = prior_study_uid
        session.execute(update(PriorLookup).where(PriorLookup.id == lookup_id).values(**values))
    log.info("prior lookup finished", extra={"lookup_id": lookup_id, "state": state.value})


def _claim(session_factory: sessionmaker[Session]) -> tuple[int, str, str | None, str, str] | None:
    """The oldest pending lookup, marked running: (id, patient ID, issuer, study date, study UID)."""
    with session_factory.begin() as session:
        row = session.execute(
            select(PriorLookup.id, Study.patient_id, Study.issuer_of_patient_id, Study.study_date, Study.study_uid)
            .join(Study, Study.id == PriorLookup.study_id)
            .where(PriorLookup.state == PriorLookupState.pending.value).order_by(PriorLookup.id).limit(1)
        ).first()
        if row is None:
            return None
        claimed = cast("CursorResult[Any]", session.execute(
            update(PriorLookup).where(PriorLookup.id == row[0], PriorLookup.state == PriorLookupState.pending.value)
            .values(state=PriorLookupState.running.value, started_at=utcnow()))).rowcount
        return tuple(row) if claimed else None  # type: ignore[return-value]


def _retrievals_today(session_factory: sessionmaker[Session]) -> int:
    with session_factory() as session:
        return int(session.execute(select(func.count()).select_from(PriorLookup).where(
            PriorLookup.prior_study_uid.is_not(None),
            PriorLookup.started_at >= utcnow() - timedelta(days=1))).scalar_one())


def look_up_one(session_factory: sessionmaker[Session], settings: Settings) -> bool:
    """Take and run the oldest pending lookup; False when there was none. Never raises for the
    PACS: its failures are the lookup's state and reason."""
    claimed = _claim(session_factory)
    if claimed is None:
        return False
    lookup_id, patient_id, issuer, study_date, study_uid = claimed
    if _retrievals_today(session_factory) >= settings.priors_max_per_day:
        _finish(session_factory, lookup_id, PriorLookupState.skipped,
                f"daily limit of {settings.priors_max_per_day} retrievals reached (CTTRIAGE_PRIORS_MAX_PER_DAY)")
        return True
    node = query_node(settings)
    try:
        day = datetime.strptime(study_date, "%Y%m%d").date()
        first = (day - timedelta(days=settings.priors_days_back)).strftime("%Y%m%d")
        last = (day - timedelta(days=1)).strftime("%Y%m%d")
        found = find_ct_studies(node, patient_id, issuer, f"{first}-{last}")
        earlier = sorted((f for f in found if f.study_uid != study_uid and f.study_date and f.study_date < study_date),
                         key=lambda f: f.study_date or "")
        if not earlier:
            _finish(session_factory, lookup_id, PriorLookupState.none,
                    f"no earlier CT study of the patient on the PACS within {settings.priors_days_back} days")
            return True
        prior = earlier[-1]
        with session_factory() as session:
            here = session.execute(select(Study.state).where(Study.study_uid == prior.study_uid)).scalar_one_or_none()
        if here is not None:
            # not recorded as retrieved: that would queue the study's own scorings after new studies
            _finish(session_factory, lookup_id, PriorLookupState.skipped,
                    f"the prior of {prior.study_date} is already here ({here})")
            return True
        with session_factory.begin() as session:  # before the move: its scoring job sees it is a prior
            session.execute(update(PriorLookup).where(PriorLookup.id == lookup_id)
                            .values(prior_study_uid=prior.study_uid))
        sent = move_study(node, prior.study_uid, settings.priors_calling_aet)
        _finish(session_factory, lookup_id, PriorLookupState.retrieved,
                f"prior of {prior.study_date} retrieved ({sent} instances)", prior.study_uid)
    except (QueryRetrieveError, OSError, ValueError) as exc:
        log.warning("prior lookup failed", extra={"lookup_id": lookup_id, "error": type(exc).__name__})
        _finish(session_factory, lookup_id, PriorLookupState.failed, f"{type(exc).__name__}: {exc}")
    return True


def run_prior_lookups(session_factory: sessionmaker[Session], settings: Settings, stop: threading.Event) -> None:
    """Loop until ``stop``: run pending lookups one after another, then wait a little."""
    while not stop.is_set():
        try:
            while look_up_one(session_factory, settings) and not stop.is_set():
                pass
        except Exception:  # database down: the next round tries again
            log.exception("prior lookups failed; retrying")
        stop.wait(settings.priors_interval_seconds)


def start_prior_lookups(session_factory: sessionmaker[Session], settings: Settings,
                        stop: threading.Event) -> threading.Thread | None:
    """The lookup thread of the DICOM process, when priors are on."""
    if not settings.priors_enabled:
        return None
    thread = threading.Thread(target=run_prior_lookups, name="prior-lookups", daemon=True,
                              args=(session_factory, settings, stop))
    thread.start()
    return thread
