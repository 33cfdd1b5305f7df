"""The Celery application: built from settings, with the scoring task registered on it.

Delivery is at-least-once: tasks are acknowledged after they finish (``acks_late``) and handed
back if the worker process dies (``reject_on_worker_lost``); :mod:`worker.jobs` makes a repeated
delivery harmless. Scoring goes to ``settings.scoring_queue`` (GPU workers in production); the
export of results to the PACS (when enabled) to the ``default`` queue.
"""

from __future__ import annotations

import logging
from functools import cached_property
from typing import TYPE_CHECKING, Any

from celery import Celery, Task, bootsteps
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from app.broker import EXPORT_TASK, SCORE_TASK, Broker, build_celery
from app.db.session import make_session_factory
from app.settings import Settings

if TYPE_CHECKING:
    from models.inference import TriageNetworks

#: Retries of a task that hit a transient error (database or broker), with exponential backoff.
MAX_TRANSIENT_RETRIES = 8

log = logging.getLogger(__name__)


class WorkerResources:
    """Per-process resources of a worker (database pool, networks), built on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def session_factory(self) -> sessionmaker[Session]:
        return make_session_factory(self.settings)

    @cached_property
    def networks(self) -> TriageNetworks | None:
        """The configured networks, kept warm (None: threshold). A loading error is not cached:
        each job reports it until the weights are fixed."""
        from worker.networks import load_networks

        return load_networks(self.settings)

    def warm_up(self, **_signal: Any) -> None:
        """Load the job code and the networks as the worker process starts (``worker_process_init``,
        sent by the solo and prefork pools alike), so the first study after a (re)start is not
        slowed by imports (about 2 s: numpy, scipy, torch), weights, CUDA start-up or compilation.
        A failure is logged here and reported by the jobs."""
        try:
            import worker.jobs  # noqa: F401  (the tasks import it again: at no cost then)

            _ = self.networks
        except Exception as exc:
            log.error("job code or networks could not be loaded at worker start",
                      extra={"error": type(exc).__name__, "reason": str(exc)})


def broker_poll_step(seconds: float) -> type[bootsteps.StartStopStep]:
    """A consumer step that has the worker's broker connection look for a task every ``seconds``
    while none is waiting. kombu's polling transports (the embedded SQLite broker) wait 1 s by
    default, most of what a released study may take to be scored; their transport options cannot
    carry it (the SQLAlchemy transport hands every option to ``create_engine``)."""

    class PollBroker(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.connection:Connection",)

        def start(self, c: Any) -> None:  # c: the worker's consumer; run again after a reconnect
            c.connection.transport.polling_interval = seconds

    return PollBroker


def create_celery(settings: Settings, resources: WorkerResources | None = None) -> Celery:
    """The worker's app, with its tasks bound to ``resources`` (the worker entry point passes the
    ones it warms up at start)."""
    app = build_celery(settings)
    if settings.embedded_broker:
        app.steps["consumer"].add(broker_poll_step(settings.embedded_broker_poll_seconds))
    broker = Broker(settings, app)
    resources = resources or WorkerResources(settings)

    @app.task(name=SCORE_TASK, bind=True, max_retries=MAX_TRANSIENT_RETRIES)
    def score_study_task(self: Task, job_id: int) -> dict[str, Any]:
        from worker.jobs import run_job  # heavy imports (numpy, scipy) only in workers

        try:
            outcome = run_job(job_id, resources.session_factory, resources.settings, worker=self.request.hostname,
                              networks=lambda: resources.networks,
                              export=broker.enqueue_export)
        except DBAPIError as exc:
            raise self.retry(exc=exc, countdown=min(2 ** self.request.retries, 60)) from exc
        return {"job_id": outcome.job_id, "status": outcome.status}

    @app.task(name=EXPORT_TASK, bind=True, max_retries=None)
    def export_results_task(self: Task, result_id: int) -> dict[str, Any]:
        """Send a result's pending objects; retried with backoff while some stay pending (the
        exports table counts the attempts and decides when to give up)."""
        from worker.exports import run_export

        try:
            run = run_export(result_id, resources.session_factory, resources.settings)
        except DBAPIError as exc:  # the database is back some time: keep trying, a minute apart at most
            raise self.retry(exc=exc, countdown=min(2 ** self.request.retries, 60)) from exc
        if run.retry_in is not None:
            raise self.retry(countdown=run.retry_in)
        return {"result_id": result_id, "sent": run.sent, "failed": run.failed}

    return app
