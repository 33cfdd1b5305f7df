"""Engine and session factory: one per process, built from settings and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings


def ensure_sqlite_folder(url: str) -> None:
    """A SQLite file's folder exists before it is opened: every command works on a fresh data folder."""
    database = make_url(url).database if url.startswith("sqlite") else None
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    """SQLite gets WAL and a busy timeout so the listener, API and worker can share one file.

    Statement parameters are hidden from every error message: they carry names, IDs and filenames,
    and an error's text ends up in logs (issue 12, item 8).
    """
    if url.startswith("sqlite"):
        ensure_sqlite_folder(url)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=10, pool_pre_ping=True, pool_recycle=1800,
                         hide_parameters=True)


def make_session_factory(settings: Settings) -> sessionmaker[Session]:
    return sessionmaker(make_engine(settings.sqlalchemy_url), expire_on_commit=False)
