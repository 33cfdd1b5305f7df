"""The service's processes, each started from settings: API, DICOM listener, assembler, worker.

``cttriage serve`` (the embedded default) runs the API and the assembler in this process, and the
DICOM listener processes (sharing one port, ``app.dicom.listener_processes``) and one Celery worker
as supervised child processes, all on SQLite (database and broker), so it needs no external server.
Production runs the same pieces as separate processes.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from app.api.main import create_app
from app.assembly import run_assembler
from app.broker import Broker
from app.db.migrate import upgrade_to_head
from app.db.session import make_session_factory
from app.lifecycle import release_running_jobs
from app.parent_watch import exit_with_parent, parent_pid_from_env
from app.prior_lookups import start_prior_lookups
from app.security import check_configured_key, ensure_bootstrap_admin
from app.settings import Settings
from app.supervision import SupervisedProcess, child_environment, stop_all

log = logging.getLogger(__name__)

#: On stop, open requests get this long before they are cancelled: the worklist's live event
#: streams never finish by themselves, and must not hold a restart up.
GRACEFUL_SHUTDOWN_SECONDS = 5
#: The signals that stop `cttriage serve`: Ctrl-C, and SIGTERM from Docker, systemd and Kubernetes.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def refuse_weak_settings(settings: Settings) -> None:
    """Before anything starts or migrates: a weak bootstrap key stops the service (ConfigurationError)."""
    if settings.bootstrap_admin_key is not None:
        check_configured_key(settings.bootstrap_admin_key)


def prepare(settings: Settings) -> None:
    """Create folders and bring the schema to head (idempotent)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.storage_root.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.sqlalchemy_url)


def bootstrap_admin(settings: Settings, session_factory: sessionmaker[Session]) -> None:
    """First start: make an admin key and show it once (on stdout, never in the log)."""
    key = ensure_bootstrap_admin(session_factory, settings.bootstrap_admin_key)
    if key:
        print(f"\n*** first start: admin API key (shown once, store it now): {key}\n"
              "*** more keys: cttriage users add NAME --role radiologist|admin\n", flush=True)


def worker_command(settings: Settings, concurrency: int, queues: list[str], device: str = "cpu") -> list[str]:
    pool = ["--pool=solo"] if concurrency == 1 else ["--pool=prefork", f"--concurrency={concurrency}"]
    # --quiet: no banner (plain text in a log of JSON lines; the settings are logged by us).
    return [sys.executable, "-m", "celery", "-A", "worker.celery_main", "--quiet", "worker", *pool,
            "-Q", ",".join(queues), "--loglevel=INFO", "--without-gossip", "--without-mingle",
            # The node name carries the pid (kept by `cttriage worker`'s exec), so a job's
            # `worker` column names the very process that ran it.
            "-n", f"cttriage-{device.replace(':', '')}-{os.getpid()}@%h"]


class StopRequested(SystemExit):
    """SIGTERM or SIGINT asked the service to stop: a clean exit (status 0), cleanup included."""


def _request_stop(signum: int, _frame: object) -> None:
    raise StopRequested(0)


def _set_stop_handlers(handler: Callable[[int, object], None] | int) -> None:
    """Signal handlers can only be set from the main thread (tests may run the service elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, handler)


def serve_embedded(settings: Settings, on_ready: Callable[[], object] | None = None) -> None:
    """Run everything on this machine until SIGINT or SIGTERM.

    uvicorn takes both signals while it runs, drains, then raises them again: with the default
    SIGTERM disposition that killed the process before the ``finally`` below, leaving the worker
    child running. Our handler turns either into :class:`StopRequested`, so cleanup always runs.
    """
    from app.dicom.listener_processes import ListenerProcesses

    refuse_weak_settings(settings)
    _set_stop_handlers(_request_stop)
    prepare(settings)
    session_factory = make_session_factory(settings)
    bootstrap_admin(settings, session_factory)
    release_running_jobs(session_factory)
    broker = Broker(settings)
    stop = threading.Event()
    worker = SupervisedProcess(
        worker_command(settings, settings.embedded_worker_concurrency, [settings.scoring_queue, "default"]),
        child_environment(settings),
    )
    # First: a DICOM port in use fails before any child starts.
    listeners = ListenerProcesses(settings, settings.listener_processes)
    assembler = threading.Thread(
        target=run_assembler, name="assembler", daemon=True,
        kwargs={"session_factory": session_factory, "broker": broker, "settings": settings, "stop": stop},
    )
    api = uvicorn.Server(uvicorn.Config(
        create_app(settings, session_factory, broker), host=settings.api_host, port=settings.api_port,
        log_config=None, access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS))
    worker.stopping = lambda: api.should_exit
    try:  # whatever ends the service (Ctrl-C, the API port in use), the worker child goes with it
        worker.start()
        listeners.start()
        assembler.start()
        start_prior_lookups(session_factory, settings, stop)
        log.info("cttriage embedded service started", extra={
            "dicom": f"{settings.ae_title}@{settings.dicom_host}:{settings.dicom_port}",
            "http": f"http://{settings.api_host}:{settings.api_port}/"})
        if on_ready is not None:
            threading.Thread(target=on_ready, name="on-ready", daemon=True).start()
        api.run()
        if not api.started:  # as uvicorn.run: the API could not start (its port in use)
            raise SystemExit(3)
    finally:
        _set_stop_handlers(signal.SIG_IGN)  # a second signal must not cut the cleanup short
        stop.set()
        stop_all([*listeners.children, worker])  # together: a worker finishing its task takes longest
        listeners.shutdown()
        if assembler.is_alive():
            assembler.join(timeout=5)


def serve_api(settings: Settings) -> None:
    refuse_weak_settings(settings)
    upgrade_to_head(settings.sqlalchemy_url)
    settings.storage_root.mkdir(parents=True, exist_ok=True)
    session_factory = make_session_factory(settings)
    bootstrap_admin(settings, session_factory)
    app = create_app(settings, session_factory, Broker(settings))
    uvicorn.run(app, host=settings.api_host, port=settings.api_port, log_config=None, access_log=False,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)


def serve_dicom(settings: Settings, processes: int | None = None) -> None:
    """The DICOM listener processes (``processes``, default ``settings.listener_processes``) on
    one port, and the assembler (settling studies, relaying the outbox) in this process, until
    SIGINT or SIGTERM."""
    from app.dicom.listener_processes import ListenerProcesses

    settings.storage_root.mkdir(parents=True, exist_ok=True)
    session_factory = make_session_factory(settings)
    listeners = ListenerProcesses(settings, processes or settings.listener_processes)
    _set_stop_handlers(_request_stop)
    stop = threading.Event()
    try:
        listeners.start()
        start_prior_lookups(session_factory, settings, stop)
        run_assembler(session_factory, Broker(settings), settings, stop)
    except KeyboardInterrupt:
        pass
    finally:
        _set_stop_handlers(signal.SIG_IGN)
        stop.set()
        listeners.shutdown()


def serve_listener_child(settings: Settings, listen_fd: int) -> None:
    """One listener process of :func:`serve_dicom` or :func:`serve_embedded`: serves the socket
    it inherited until SIGTERM (its supervisor's stop) or its supervisor is gone."""
    import socket

    from app.dicom.listener import serve_listener

    exit_with_parent(parent_pid_from_env())
    _set_stop_handlers(_request_stop)
    listening = socket.socket(fileno=listen_fd)
    try:
        serve_listener(settings, make_session_factory(settings), listening)
    except KeyboardInterrupt:
        pass
