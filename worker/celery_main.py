"""Entry point for `celery -A worker.celery_main worker`: the app built from the environment.

The worker logs like the other processes (structured lines, no patient data): receiving
``setup_logging`` makes Celery leave logging to us, its own messages included. Each worker
process loads its networks as it starts (``worker_process_init``, sent by the solo and prefork
pools alike), not on its first study. Started by `cttriage serve`, the worker stops when that
process is gone, however it went (:mod:`app.parent_watch`).
"""

import logging
import os
from typing import Any

import celery.apps.worker
from celery.signals import setup_logging, worker_process_init

from app.logging_setup import configure_logging
from app.parent_watch import exit_with_parent, parent_pid_from_env
from app.settings import get_settings
from worker.celery_app import WorkerResources, create_celery

exit_with_parent(parent_pid_from_env())  # first: a parent gone while we started is noticed at once
settings = get_settings()
resources = WorkerResources(settings)
app = create_celery(settings, resources)
worker_process_init.connect(resources.warm_up, weak=False)


configure_logging(settings.log_level, settings.log_json)  # now: warnings raised before setup_logging too


@setup_logging.connect
def _structured_logging(**_signal: Any) -> None:
    configure_logging(settings.log_level, settings.log_json)


def _say(message: str, _file: object = None) -> None:
    """Celery's shutdown notices ('worker: Warm shutdown'), which it writes raw to stdout, as log
    lines. Called from signal handlers: formatted without the logging locks, written in one write."""
    record = logging.LogRecord("celery.apps.worker", logging.INFO, __file__, 0, message.strip(), None, None)
    handlers = logging.getLogger().handlers
    line = handlers[0].format(record) if handlers else message.strip()
    os.write(2, (line + "\n").encode())


celery.apps.worker.safe_say = _say
