"""Alembic migrations run on SQLite and PostgreSQL and match the models."""

from __future__ import annotations

import uuid
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from app.db.migrate import alembic_config, upgrade_to_head
from app.db.models import Base
from tests.conftest import PG_ADMIN_URL

TABLES = {"studies", "series", "instances", "jobs", "results", "quarantined_files", "api_keys", "audit_events",
          "alembic_version"}


def check_round_trip(url: str) -> None:
    upgrade_to_head(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        assert TABLES <= set(inspect(conn).get_table_names())
        # Expression indexes (DESC NULLS LAST) are not reflected; they are checked by name below.
        context = MigrationContext.configure(conn, opts={"include_object": lambda obj, name, kind, *_: not (
            kind == "index" and str(name).startswith("ix_studies_worklist"))})
        diff = compare_metadata(context, Base.metadata)
        assert diff == [], f"models and migrations differ: {diff}"
        worklist_index = f"ix_studies_worklist_{'pg' if conn.dialect.name == 'postgresql' else 'sqlite'}"
        indexes = (
            conn.execute(text("SELECT indexname FROM pg_indexes WHERE tablename = 'studies'")).scalars().all()
            if conn.dialect.name == "postgresql"
            else conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'index'")).scalars().all()
        )
        assert worklist_index in indexes
    command.downgrade(alembic_config(url), "base")
    with engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
    upgrade_to_head(url)
    engine.dispose()


def test_sqlite_round_trip(tmp_path: Path) -> None:
    check_round_trip(f"sqlite:///{tmp_path / 'm.sqlite'}")


def test_postgresql_round_trip() -> None:
    name = f"cttriage_mig_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        check_round_trip(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE "{name}"'))
        admin.dispose()
