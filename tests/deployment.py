"""A production deployment on this machine for tests and benchmarks: `cttriage dicom`, `cttriage api`
and N `cttriage worker` processes against the real PostgreSQL and Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port
from tests.service_process import API, ServiceProcess, cttriage, wait_healthy, wait_listening, wait_until


@dataclass
class Deployment:
    root: Path
    env: dict[str, str]
    api: str
    dicom_port: int
    processes: dict[str, ServiceProcess] = field(default_factory=dict)

    def start(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> ServiceProcess:
        """Start ``cttriage *args`` as ``name`` (log ``<name>.log``); ``env`` overrides settings for it alone."""
        process = ServiceProcess(cttriage(*args), {**self.env, **(env or {})}, self.root / f"{name}.log").start()
        self.processes[name] = process
        return process

    def retire(self, name: str) -> None:
        """Stop ``name`` and forget it, so that it no longer counts among the live processes."""
        self.processes.pop(name).stop()

    def workers(self) -> list[ServiceProcess]:
        return [p for name, p in self.processes.items() if name.startswith("worker")]

    def dead(self) -> list[str]:
        """The processes that have exited: a benchmark stops rather than waits for them."""
        return [name for name, p in self.processes.items() if not p.alive()]

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until the API answers, the listener accepts and every worker has logged `ready.`; fails at
        once when a process exits."""
        deadline = time.monotonic() + timeout
        wait_healthy(self.api, timeout=timeout, logs=self.logs)
        wait_listening(self.dicom_port, self.processes["dicom"], timeout=max(deadline - time.monotonic(), 1.0))

        def workers_ready_or_dead() -> bool:
            return bool(self.dead()) or all(" ready." in w.log() for w in self.workers())

        wait_until(workers_ready_or_dead, max(deadline - time.monotonic(), 1.0), "the workers", interval=0.2,
                   logs=self.logs)
        if self.dead():
            raise RuntimeError(f"process(es) exited while starting: {', '.join(self.dead())}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{p.log()[-3000:]}" for name, p in self.processes.items())

    def study(self, uid: str) -> dict:  # type: ignore[type-arg]
        return API.get(f"{self.api}/api/studies/{uid}", timeout=10).json()  # type: ignore[no-any-return]

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop()


def start_deployment(root: Path, pg_url: str, redis_url: str, workers: int = 1, **settings: str) -> Deployment:
    """Start the processes on free ports under ``root``, the API answering; ``settings`` are extra
    CTTRIAGE_* values (``settle_seconds="2"``). Start other workers with :meth:`Deployment.start`."""
    api_port, dicom_port = free_port(), free_port()
    env = {
        "CTTRIAGE_DATABASE_URL": pg_url,
        "CTTRIAGE_BROKER_URL": redis_url,
        # Test runs beside each other share Redis; each deployment keeps to its own keys.
        "CTTRIAGE_BROKER_KEY_PREFIX": f"cttriage-test-{uuid.uuid4().hex[:8]}:",
        "CTTRIAGE_STORAGE_DIR": str(root / "storage"),
        "CTTRIAGE_DATA_DIR": str(root),
        "CTTRIAGE_API_PORT": str(api_port),
        "CTTRIAGE_DICOM_PORT": str(dicom_port),
        "CTTRIAGE_SETTLE_SECONDS": "2",
        "CTTRIAGE_ASSEMBLER_INTERVAL_SECONDS": "0.5",
        "CTTRIAGE_MIN_FREE_BYTES": "0",
        **{f"CTTRIAGE_{k.upper()}": v for k, v in settings.items()},
    }
    deployment = Deployment(root, env, f"http://127.0.0.1:{api_port}", dicom_port)
    deployment.start("dicom", "dicom")
    deployment.start("api", "api")
    for i in range(workers):
        deployment.start(f"worker{i}", "worker", "--device", "cpu")
    try:
        wait_healthy(deployment.api, timeout=90, logs=deployment.logs)
    except BaseException:
        deployment.stop()
        raise
    return deployment
