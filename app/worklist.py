"""The worklist query: filters and the urgency order, shared by the API and its benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any

from sqlalchemy import ColumnElement, Select, select

from app.db.models import Study


def worklist_order() -> tuple[ColumnElement[Any], ...]:
    """Most urgent first (priority, see models.priority); unscored studies after, oldest first.

    Matches the ``ix_studies_worklist_*`` indexes, so a page is an index scan at any size.
    """
    return (Study.priority.desc().nulls_last(), Study.first_received_at.asc(), Study.id.asc())


def worklist_query(states: Sequence[str] | None = None, received_from: date | None = None,
                   received_to: date | None = None, bands: Sequence[int] | None = None,
                   zone: tzinfo = UTC, *, patient_id: str | None = None) -> Select[Study]:
    """Studies matching the filters, unordered (callers add the order and the page).

    The days are calendar days in ``zone`` (the reader's, not the server's): from its midnight,
    up to the next day's midnight. ``patient_id`` matches exactly.
    """
    query = select(Study)
    if patient_id:
        query = query.where(Study.patient_id == patient_id)
    if states:
        query = query.where(Study.state.in_(list(states)))
    if bands:
        query = query.where(Study.severity_band.in_(list(bands)))
    if received_from:
        query = query.where(Study.first_received_at >= datetime.combine(received_from, time.min, zone))
    if received_to:
        query = query.where(Study.first_received_at < datetime.combine(received_to + timedelta(days=1), time.min, zone))
    return query
