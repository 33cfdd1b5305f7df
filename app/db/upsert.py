"""INSERT ... ON CONFLICT DO NOTHING on PostgreSQL and SQLite alike.

Concurrent associations may deliver the first instances of one study at the same moment; the
unique constraints decide the winner and the loser simply reads the row back.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from app.db.models import Base


def ignoring_insert(dialect: str, table: Table, key: str) -> Any:
    """``INSERT INTO table ... ON CONFLICT (key) DO NOTHING`` for the session's backend; the caller
    adds values or a SELECT, and RETURNING."""
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=[key])
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=[key])
    raise NotImplementedError(f"unsupported database dialect {dialect}")  # pragma: no cover - two backends


@cache
def _insert_ignore_statement(dialect: str, table: Table, key: str) -> Any:
    """Built once per table: executed with parameters, its compiled form is reused (C-STORE hot path)."""
    # RETURNING says whether a row went in (a Core insert's rowcount is -1 on psycopg, which
    # returns the primary key implicitly).
    return ignoring_insert(dialect, table, key).returning(table.c[key])


def dialect_name(executor: Connection | Session) -> str:
    """``postgresql`` or ``sqlite``, for a Core connection or an ORM session alike."""
    if isinstance(executor, Connection):
        return executor.dialect.name
    return executor.get_bind().dialect.name


def insert_ignore(
    session: Connection | Session, model: type[Base], values: dict[str, Any], key: str
) -> bool:
    """Insert ``values`` unless a row with the same ``key`` exists. Returns True if inserted."""
    statement = _insert_ignore_statement(dialect_name(session), model.__table__, key)
    return session.execute(statement, values).first() is not None
