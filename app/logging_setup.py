"""Structured logging: one JSON object per line, with the `extra` fields of each call.

Callers never log patient data (names, IDs, birth dates); log UIDs, counts, states, timings.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class ExceptionTypeOnly(logging.Filter):
    """A library's exception log keeps the exception's type, not its text or traceback: the text of
    a database error quotes statements and values. Our own handlers log the type and stack once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None:
            record.msg = f"{record.getMessage()} ({record.exc_info[0].__name__})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def configure_logging(level: str = "INFO", json_lines: bool = True) -> None:
    """One handler on the root logger; library chatter down to what an operator needs."""
    handler = logging.StreamHandler(sys.stderr)
    plain = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    handler.setFormatter(JsonFormatter() if json_lines else plain)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO and may echo dataset contents at DEBUG.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # highdicom logs each step of building a SEG or SR at INFO: two thirds of a worker's log.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    # uvicorn's error log repeats an unhandled exception in full; its access log has query strings
    # (patient IDs in filters). SQLAlchemy's engine log would print statement parameters.
    uvicorn_error = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, ExceptionTypeOnly) for f in uvicorn_error.filters):
        uvicorn_error.addFilter(ExceptionTypeOnly())
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)
    # Warnings (Celery's SecurityWarning, deprecations) become log lines, not raw text on stderr.
    logging.captureWarnings(True)
