"""Clear answers for bad input and a database outage, and no statement parameters in any log (issue 12, items 7-8)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from app.api.main import create_app
from app.db.session import make_engine
from app.logging_setup import ExceptionTypeOnly, JsonFormatter
from app.security import Role, create_api_key
from app.settings import Settings
from tests.conftest import free_port
from tests.test_dicom_listener import ct_slice, write_file

MARKER = "MARKER-Doe-Jane-4711"


def _client(settings: Settings, factory: sessionmaker[Session]) -> tuple[TestClient, dict[str, str]]:
    with factory.begin() as session:
        key = create_api_key(session, "boss", Role.admin)
    return TestClient(create_app(settings, factory, None)), {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("url", [
    "/api/admin/audit?actor=a%00b", "/api/studies/1.2%003", "/api/worklist?patient_id=%00",
    "/api/worklist?offset=9223372036854775808", "/api/worklist?tz=" + "A" * 300,
    "/api/quarantine?offset=99999999999999999999",
])
def test_bad_parameters_are_4xx_problems(sqlite_settings: Settings, sqlite_factory: sessionmaker[Session],
                                         url: str) -> None:
    client, auth = _client(sqlite_settings, sqlite_factory)
    answer = client.get(url, headers=auth)
    assert 400 <= answer.status_code < 500, answer.text
    assert answer.headers["content-type"] == "application/problem+json"


def test_database_outage_is_503_with_retry_after(sqlite_settings: Settings) -> None:
    factory = sessionmaker(make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gone"))
    client = TestClient(create_app(sqlite_settings, factory, None))
    for url in ("/metrics", "/api/worklist", "/api/studies/1.2.3"):
        answer = client.get(url, headers={"Authorization": "Bearer ctt_whatever-key-0123456789abcdef"})
        assert answer.status_code == 503, (url, answer.text)
        assert answer.headers["Retry-After"].isdigit()
        assert answer.headers["content-type"] == "application/problem+json"


def test_uid_with_a_slash_is_reachable_percent_encoded(sqlite_settings: Settings, sqlite_factory: sessionmaker[Session],
                                                        tmp_path: Path) -> None:
    client, auth = _client(sqlite_settings, sqlite_factory)
    ds = ct_slice("1.2.3/45", "1.2.3.46", 0)
    write_file(ds, tmp_path / "slash.dcm")
    stored = client.post("/api/studies", headers=auth,
                         files={"files": ("slash.dcm", (tmp_path / "slash.dcm").read_bytes())})
    assert stored.status_code == 202, stored.text
    assert client.get("/api/studies/1.2.3%2F45", headers=auth).json()["study_uid"] == "1.2.3/45"
    assert client.get("/studies/1.2.3%2F45").status_code == 200  # the page
    assert client.get("/api/studies/1.2.3%2F45/images/axial.png", headers=auth).status_code == 404
    assert client.post("/api/studies/1.2.3%2F45/rescore", headers=auth).status_code == 202


def test_forced_database_error_during_upload_logs_no_values(
        sqlite_settings: Settings, sqlite_factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture) -> None:
    client, auth = _client(sqlite_settings, sqlite_factory)
    with sqlite_factory.begin() as session:
        session.execute(text("DROP TABLE quarantined_files"))  # quarantining the upload fails in SQL
    with caplog.at_level(logging.DEBUG):
        answer = client.post("/api/studies", headers=auth, files={"files": (f"{MARKER}.txt", MARKER.encode())})
    assert answer.status_code == 503 and MARKER not in answer.text
    formatter = JsonFormatter()
    logged = "\n".join(formatter.format(record) for record in caplog.records)
    assert "OperationalError" in logged and MARKER not in logged


def test_a_bug_is_logged_once_without_its_text(sqlite_settings: Settings, sqlite_factory: sessionmaker[Session],
                                               caplog: pytest.LogCaptureFixture) -> None:
    client, _auth = _client(sqlite_settings, sqlite_factory)

    @client.app.get("/boom")  # type: ignore[attr-defined]
    def boom() -> None:
        raise RuntimeError(MARKER)

    with caplog.at_level(logging.DEBUG):
        answer = client.get("/boom")  # raise_server_exceptions: a re-raise to the server would fail here
    assert answer.status_code == 500 and answer.headers["content-type"] == "application/problem+json"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and MARKER not in JsonFormatter().format(errors[0])


def test_uvicorn_error_log_keeps_the_type_only() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.uvicorn.error")
    logger.addHandler(handler)
    logger.addFilter(ExceptionTypeOnly())
    try:
        raise ValueError(f"parameters: {MARKER}")
    except ValueError:
        logger.exception("Exception in ASGI application")
    assert "ValueError" in stream.getvalue() and MARKER not in stream.getvalue()
