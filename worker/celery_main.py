"""Entry point for `celery -A worker.celery_main worker`: the app built from the environment.

The worker logs like the other processes (structured lines, no patient data): receiving
``setup_logging`` makes Celery leave logging to us, its own messages included. Each worker
process loads its networks as it starts (``worker_process_init``, sent by the solo and prefork
pools alike), not on its first study.
"""

from typing import Any

from celery.signals import setup_logging, worker_process_init

from app.logging_setup import configure_logging
from app.settings import get_settings
from worker.celery_app import WorkerResources, create_celery

settings = get_settings()
resources = WorkerResources(settings)
app = create_celery(settings, resources)
worker_process_init.connect(resources.warm_up, weak=False)


@setup_logging.connect
def _structured_logging(**_signal: Any) -> None:
    configure_logging(settings.log_level, settings.log_json)
