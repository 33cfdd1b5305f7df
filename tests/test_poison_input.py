"""Header values the databases cannot store, sent through the real C-STORE path (issue 12, item 2).

A NUL (or an undecodable byte) used to fail the record as a database error, answered 0xA700 so
the PACS retried the same bytes forever. Now a shown field is cleaned and stored, and a key (a UID,
the study date) makes the instance unreadable: 0xC000, quarantined with a reason naming the field.
Every case runs on SQLite and on the real PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from app.db.models import QuarantinedFile, Series, Study
from app.errors import STATUS_CANNOT_UNDERSTAND, STATUS_SUCCESS
from tests.test_dicom_listener import (  # noqa: F401 - _send_files_as_is and start: fixtures used here
    Listener,
    _send_files_as_is,
    ct_slice,
    start,
    write_file,
)

pytestmark = pytest.mark.timeout(60)

CLEANED = {  # keyword: (value sent, column, value stored)
    "AccessionNumber": ("ACC\x001", (Study, "accession_number"), "ACC1"),
    "StudyDescription": ("CT\x00 CHEST", (Study, "study_description"), "CT CHEST"),
    "SeriesDescription": ("Lung\x00 1.0", (Series, "description"), "Lung 1.0"),
}
REFUSED = {"StudyDate": "2024\x000102", "StudyInstanceUID": "9.99.99\x00.1"}


@pytest.fixture(params=["sqlite", "postgresql"])
def listener(request: pytest.FixtureRequest, start: Callable[..., Listener], tmp_path: Path) -> Listener:  # noqa: F811
    if request.param == "sqlite":
        return start()
    return start(database_url=request.getfixturevalue("pg_url"))


def _slice(tmp_path: Path, name: str, **values: Any) -> tuple[Path, str]:
    study_uid = generate_uid()
    ds = ct_slice(study_uid, generate_uid(), 0)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    path = tmp_path / f"{name}.dcm"
    write_file(ds, path)
    return path, str(ds.StudyInstanceUID)


@pytest.mark.parametrize("keyword", sorted(CLEANED))
def test_nul_in_a_shown_field_is_cleaned_and_stored(listener: Listener, tmp_path: Path, keyword: str) -> None:
    sent, (model, column), stored = CLEANED[keyword]
    path, study_uid = _slice(tmp_path, keyword, **{keyword: sent})
    assert listener.store([path]) == [STATUS_SUCCESS]
    assert listener.store([path]) == [STATUS_SUCCESS]  # a re-send is a duplicate, not a retry-forever
    with listener.session_factory() as session:
        query = select(getattr(model, column))
        query = query.join(Study) if model is Series else query
        assert session.scalars(query.where(Study.study_uid == study_uid)).all() == [stored]


@pytest.mark.parametrize("keyword", sorted(REFUSED))
def test_nul_in_an_identifier_is_quarantined_not_retried(listener: Listener, tmp_path: Path, keyword: str) -> None:
    path, _study_uid = _slice(tmp_path, keyword, **{keyword: REFUSED[keyword]})
    before = _quarantined(listener, keyword)
    assert listener.store([path]) == [STATUS_CANNOT_UNDERSTAND]
    assert _quarantined(listener, keyword) == before + 1
    with listener.session_factory() as session:
        assert session.scalars(select(Study.study_uid).where(Study.study_uid.startswith("9.99.99"))).all() == []
    # The reason names the field and never echoes the value.
    with listener.session_factory() as session:
        reasons = session.scalars(select(QuarantinedFile.reason).where(QuarantinedFile.reason.contains(keyword))).all()
    assert all("\x00" not in reason and REFUSED[keyword] not in reason for reason in reasons)


def test_undecodable_bytes_in_a_description_are_replaced(listener: Listener, tmp_path: Path) -> None:
    path, study_uid = _slice(tmp_path, "utf8", SpecificCharacterSet="ISO_IR 192", StudyDescription="CT CHEST")
    data = path.read_bytes()
    assert data.count(b"CT CHEST") == 1
    path.write_bytes(data.replace(b"CT CHEST", b"CT\xff\xfeHEST"))
    assert listener.store([path]) == [STATUS_SUCCESS]
    with listener.session_factory() as session:
        [description] = session.scalars(select(Study.study_description).where(Study.study_uid == study_uid)).all()
    assert description is not None and description.startswith("CT") and description.endswith("HEST")
    assert "\x00" not in description


def _quarantined(listener: Listener, keyword: str) -> int:
    with listener.session_factory() as session:
        return len(session.scalars(select(QuarantinedFile.id).where(QuarantinedFile.reason.contains(keyword))).all())
