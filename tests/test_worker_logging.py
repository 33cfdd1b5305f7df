"""The README promises JSON lines: the worker's Celery output and Python warnings included, and
highdicom's step-by-step INFO lines left out."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.logging_setup import configure_logging


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    # An earlier test that ran the CLI in this process (configure_logging) left warnings captured
    # with its own test's recorder saved: captureWarnings(True) would then do nothing here.
    logging.captureWarnings(False)
    yield
    logging.captureWarnings(False)
    root.handlers[:] = handlers
    root.setLevel(level)


def test_highdicom_is_quiet_and_warnings_are_log_lines(restored_logging: None,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", json_lines=True)
    logging.getLogger("highdicom.seg.sop").info("building segment 1")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("superuser privileges", UserWarning, stacklevel=1)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert [(entry["logger"], "superuser privileges" in entry["message"]) for entry in lines] == [("py.warnings", True)]


def test_worker_output_is_json_lines_only(tmp_path: Path) -> None:
    env = {**os.environ, "CTTRIAGE_DATA_DIR": str(tmp_path / "data")}
    env.pop("CTTRIAGE_DATABASE_URL", None)
    env.pop("CTTRIAGE_BROKER_URL", None)
    cli = [sys.executable, "-m", "app.cli"]
    subprocess.run([*cli, "migrate"], env=env, check=True, capture_output=True, timeout=120)
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen([*cli, "worker"], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while " ready." not in log.read_text() and time.monotonic() < deadline:
                assert worker.poll() is None, log.read_text()
                time.sleep(0.3)
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
        finally:
            if worker.poll() is None:
                worker.kill()
    text = log.read_text()
    assert " ready." in text, text[-3000:]
    for line in filter(str.strip, text.splitlines()):
        entry = json.loads(line)  # no banner, no raw warning, no raw 'Warm shutdown'
        assert {"time", "level", "logger", "message"} <= entry.keys()
    assert "Warm shutdown" in text
