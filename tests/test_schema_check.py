"""`cttriage dicom` and `cttriage worker` on a database that was never migrated: one line, status 2
(they used to log a traceback every second)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.script import ScriptDirectory

from app.db.migrate import alembic_config, schema_problem, upgrade_to_head


def _run(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CTTRIAGE_DATA_DIR": str(data_dir)}
    env.pop("CTTRIAGE_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.mark.parametrize("process", ["dicom", "worker"])
def test_unmigrated_database_is_refused_with_one_line(tmp_path: Path, process: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    sqlite3.connect(data / "cttriage.sqlite").close()  # a database, without the schema
    result = _run(process, data_dir=data)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (f"cttriage {process}: the database has no cttriage schema; "
                                      "run `cttriage migrate` first"), result.stderr[-2000:]


def test_schema_problems(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert schema_problem(url) == f"no database at {tmp_path / 'db.sqlite'}"
    script = ScriptDirectory.from_config(alembic_config(url))
    first = list(script.walk_revisions())[-1].revision
    command.upgrade(alembic_config(url), first)
    if first not in script.get_heads():
        assert f"at revision {first}" in (schema_problem(url) or "")
    upgrade_to_head(url)
    assert schema_problem(url) is None
    assert schema_problem("postgresql+psycopg://nobody@127.0.0.1:1/none") is None  # unreachable: not ours
