"""API keys have a minimum length and variety; a weak bootstrap key stops start-up in one line (issue 12, item 9)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.errors import ConfigurationError
from app.security import MIN_KEY_LENGTH, ensure_bootstrap_admin, generate_key, key_weakness
from tests.conftest import ROOT, free_port

STRONG = "ctt_test-admin-key-not-for-production-0123456789"


@pytest.mark.parametrize("key", ["x", "a" * 40, "abcdefghij" * 3, "0123456789" * 3, "Aa1-" * 10, "Ab3$eF7&jK" * 2])
def test_weak_keys_are_named(key: str) -> None:
    weakness = key_weakness(key)
    assert weakness is not None and key not in weakness


def test_generated_and_test_keys_are_strong() -> None:
    assert all(key_weakness(generate_key()) is None for _ in range(200))
    assert key_weakness(STRONG) is None
    assert len(generate_key()) >= MIN_KEY_LENGTH


def test_weak_bootstrap_key_is_refused_even_after_the_first_start(sqlite_factory: sessionmaker[Session]) -> None:
    with pytest.raises(ConfigurationError, match="CTTRIAGE_BOOTSTRAP_ADMIN_KEY is 1 characters long"):
        ensure_bootstrap_admin(sqlite_factory, "x")
    assert ensure_bootstrap_admin(sqlite_factory, STRONG) is None  # registered, not echoed
    with pytest.raises(ConfigurationError):
        ensure_bootstrap_admin(sqlite_factory, "short")


@pytest.mark.timeout(120)
def test_api_refuses_to_start_with_a_weak_key_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CTTRIAGE_DATA_DIR": str(tmp_path / "data"),
           "CTTRIAGE_BOOTSTRAP_ADMIN_KEY": "hunter", "CTTRIAGE_API_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "-m", "app.cli", "api"], env=env, capture_output=True, text=True,
                          timeout=100, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "CTTRIAGE_BOOTSTRAP_ADMIN_KEY is 6 characters long" in lines[0]
    assert "hunter" not in done.stderr + done.stdout
