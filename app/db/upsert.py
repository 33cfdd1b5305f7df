"""INSERT ... ON CONFLICT DO NOTHING on PostgreSQL and SQLite alike.

Concurrent associations may deliver the first instances of one study at the same moment; the
unique constraints decide the winner and the loser simply reads the row back.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Session


def insert_ignore(session: Session, model: type[DeclarativeBase], values: dict[str, Any], key: str) -> bool:
    """Insert ``values`` unless a row with the same ``key`` exists. Returns True if inserted."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        stmt: Any = postgresql.insert(model).values(**values).on_conflict_do_nothing(index_elements=[key])
    elif dialect == "sqlite":
        stmt = sqlite.insert(model).values(**values).on_conflict_do_nothing(index_elements=[key])
    else:  # pragma: no cover - only the two supported backends
        raise NotImplementedError(f"unsupported database dialect {dialect}")
    # RETURNING, not rowcount: drivers disagree on rowcount for a skipped insert.
    return session.execute(stmt.returning(model.__table__.c[key])).first() is not None
