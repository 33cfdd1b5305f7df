"""Entry point for `celery -A worker.celery_main worker`: the app built from the environment.

The worker logs like the other processes (structured lines, no patient data): receiving
``setup_logging`` makes Celery leave logging to us, its own messages included.
"""

from typing import Any

from celery.signals import setup_logging

from app.logging_setup import configure_logging
from app.settings import get_settings
from worker.celery_app import create_celery

settings = get_settings()
app = create_celery(settings)


@setup_logging.connect
def _structured_logging(**_signal: Any) -> None:
    configure_logging(settings.log_level, settings.log_json)
