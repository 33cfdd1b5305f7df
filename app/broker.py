"""The hand-off to Celery: the one place the service builds a Celery app to send tasks.

The task names and queues are constants here, so the sending side (API, assembler) needs nothing
of the worker; the worker registers its tasks under the same names on an app built by
:func:`build_celery`, and sends its own follow-up tasks through a :class:`Broker` over that app.
"""

from __future__ import annotations

from collections.abc import Callable

from celery import Celery

from app.settings import Settings

SCORE_TASK = "cttriage.score_study"
#: Results back to the PACS: light work, on the default queue (not the GPU one).
EXPORT_TASK = "cttriage.export_results"
EXPORT_QUEUE = "default"

#: Hands (job id, queue priority) to the broker, returns the broker's task id; raises if it is down.
Enqueue = Callable[[int, int], str]
#: Hands a result id to the broker's export queue; raises when the broker is down.
EnqueueExport = Callable[[int], object]


def build_celery(settings: Settings) -> Celery:
    """The configured Celery app, without tasks (the worker registers them on it)."""
    app = Celery("cttriage", broker=settings.celery_broker_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        task_default_queue="default",
        task_routes={SCORE_TASK: {"queue": settings.scoring_queue}, EXPORT_TASK: {"queue": EXPORT_QUEUE}},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        # Publishing must fail fast when the broker is down: the job stays in the outbox.
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0.2, "interval_step": 0.2},
        # Redis redelivers an unacknowledged task after this long; it must outlast a scoring.
        # Priorities 0 (first) .. 9 emulated with one Redis list per step (see app.priority).
        broker_transport_options=(
            {} if settings.embedded_broker else {
                "visibility_timeout": int(settings.processing_timeout_seconds) + 60,
                "priority_steps": list(range(10)),
                "sep": ":",
                "queue_order_strategy": "priority",
                **({"global_keyprefix": settings.broker_key_prefix} if settings.broker_key_prefix else {}),
            }
        ),
        worker_hijack_root_logger=False,
    )
    return app


class Broker:
    """Sends scoring and export tasks and probes the broker; every method raises when it is down."""

    def __init__(self, settings: Settings, celery_app: Celery | None = None) -> None:
        self.settings = settings
        self.celery_app = celery_app or build_celery(settings)

    def enqueue_scoring(self, job_id: int, priority: int) -> str:
        """Hand a job to the scoring queue at ``priority`` (0 first); returns the task id."""
        return str(self.celery_app.send_task(SCORE_TASK, args=[job_id], queue=self.settings.scoring_queue,
                                             priority=priority).id)

    def enqueue_export(self, result_id: int) -> str:
        """Hand a result's pending exports to the export queue; returns the task id."""
        return str(self.celery_app.send_task(EXPORT_TASK, args=[result_id], queue=EXPORT_QUEUE).id)

    def ping(self) -> None:
        """Raise when the broker cannot be reached within a couple of seconds."""
        with self.celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)

    def responding_workers(self, timeout: float) -> list[str]:
        """The workers answering a broadcast ping (Redis only: the embedded broker has no broadcast)."""
        self.ping()  # fails fast when the broker is down (inspect alone retries for long)
        return sorted(self.celery_app.control.inspect(timeout=timeout).ping() or {})
