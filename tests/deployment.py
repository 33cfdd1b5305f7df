"""A production deployment on this machine for tests: `cttriage dicom`, `cttriage api` and N
`cttriage worker` processes against the real PostgreSQL and Redis."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port
from tests.service_process import API, ServiceProcess, cttriage, wait_healthy


@dataclass
class Deployment:
    root: Path
    env: dict[str, str]
    api: str
    dicom_port: int
    processes: dict[str, ServiceProcess] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> ServiceProcess:
        process = ServiceProcess(cttriage(*args), self.env, self.root / f"{name}.log").start()
        self.processes[name] = process
        return process

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{p.log()[-3000:]}" for name, p in self.processes.items())

    def study(self, uid: str) -> dict:  # type: ignore[type-arg]
        return API.get(f"{self.api}/api/studies/{uid}", timeout=10).json()  # type: ignore[no-any-return]

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop()


def start_deployment(root: Path, pg_url: str, redis_url: str, workers: int = 1, **settings: str) -> Deployment:
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
