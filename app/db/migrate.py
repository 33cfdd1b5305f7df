"""Run the Alembic migrations in `migrations/` against a database URL."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from app.db.session import ensure_sqlite_folder

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_to_head(url: str) -> None:
    """Bring the schema to the newest revision; safe to run on every start."""
    ensure_sqlite_folder(url)
    command.upgrade(alembic_config(url), "head")


def schema_problem(url: str) -> str | None:
    """Why the database at ``url`` cannot serve this code (no schema, an older one), or None.

    The processes that do not migrate by themselves (`dicom`, `worker`) check this at start: on an
    unmigrated database they used to log a traceback every second. A database that cannot be
    reached is no schema problem: the services wait for it as for any outage.
    """
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:" and not Path(database).exists():
            return f"no database at {database}"
    engine = create_engine(url)
    try:
        with engine.connect() as connection:  # read directly: alembic's MigrationContext logs at INFO
            current = (set(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())
                       if inspect(connection).has_table("alembic_version") else set())
    except OperationalError:
        return None
    finally:
        engine.dispose()
    if not current:
        return "the database has no cttriage schema"
    script = ScriptDirectory.from_config(alembic_config(url))
    heads = set(script.get_heads())
    known = {revision.revision for revision in script.walk_revisions()}
    if current != heads and current <= known:  # a newer, unknown revision is a newer release's: not ours to judge
        return f"the database schema is at revision {', '.join(sorted(current))}, not {', '.join(sorted(heads))}"
    return None
