"""Running cttriage processes for tests: start, wait until they answer, stop, read their logs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
#: Registered by the services under test as their first admin key (CTTRIAGE_BOOTSTRAP_ADMIN_KEY).
ADMIN_KEY = "ctt_test-admin-key-not-for-production-0123456789"
#: An HTTP client that authenticates as that admin.
API = httpx.Client(headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)


@dataclass
class ServiceProcess:
    """A child process with its log file; stopped (and its children) on exit."""

    args: list[str]
    env: Mapping[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: Any = field(default=None, repr=False)

    def start(self) -> ServiceProcess:
        self._log = self.log_path.open("ab")
        env = {**os.environ, "CTTRIAGE_BOOTSTRAP_ADMIN_KEY": ADMIN_KEY, **self.env}
        # From the repository root, so that ``python -m app.cli`` runs this checkout's code.
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        """SIGTERM to the process group, then SIGKILL to whatever is left in it (prefork children,
        a hung parent): nothing a test or benchmark started outlives it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)
        if self._log:
            self._log.close()
            self._log = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def cttriage(*args: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", *args]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.3,
               logs: Callable[[], str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # not up yet
            last_error = exc
        time.sleep(interval)
    tail = logs()[-4000:] if logs else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error})\n{tail}")


def wait_started(process: ServiceProcess, ready: Callable[[], Any], timeout: float, what: str) -> None:
    """Until ``ready()`` is true; fails at once, with its log, if ``process`` exits meanwhile."""
    wait_until(lambda: not process.alive() or ready(), timeout, what, interval=0.2, logs=process.log)
    if not process.alive():
        raise RuntimeError(f"{process.log_path.name}: exited while starting:\n{process.log()[-2000:]}")


def wait_listening(port: int, process: ServiceProcess, timeout: float = 60.0) -> None:
    """Until something accepts TCP connections on ``port`` (a listener that is up)."""

    def accepting() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    wait_started(process, accepting, timeout, f"a listener on port {port}")


def wait_healthy(base_url: str, timeout: float = 60.0, logs: Callable[[], str] | None = None) -> None:
    wait_until(lambda: httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200, timeout, "the API", logs=logs)


def wait_for_state(base_url: str, study_uid: str, states: tuple[str, ...] = ("scored", "failed", "rejected"),
                   timeout: float = 240.0, logs: Callable[[], str] | None = None) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        response = API.get(f"{base_url}/api/studies/{study_uid}", timeout=5)
        if response.status_code != 200:
            return None
        body: dict[str, Any] = response.json()
        return body if body["state"] in states else None

    return wait_until(done, timeout, f"study to reach {states}", interval=0.5, logs=logs)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class EmbeddedService:
    """A running ``cttriage serve`` (API, DICOM listener, assembler, worker) on its own data folder."""

    api: str
    dicom_port: int
    process: ServiceProcess
    data_dir: Path


@contextmanager
def embedded_service(root: Path, **settings: str) -> Iterator[EmbeddedService]:
    """Start ``cttriage serve`` on free ports under ``root``; ``settings`` are extra CTTRIAGE_* variables."""
    api_port, dicom_port = free_port(), free_port()
    env = {
        "CTTRIAGE_DATA_DIR": str(root / "data"),
        "CTTRIAGE_API_PORT": str(api_port),
        "CTTRIAGE_DICOM_PORT": str(dicom_port),
        "CTTRIAGE_MIN_FREE_BYTES": "0",
        **settings,
    }
    process = ServiceProcess(cttriage("serve"), env, root / "service.log").start()
    api = f"http://127.0.0.1:{api_port}"
    try:
        wait_healthy(api, timeout=90, logs=process.log)
        yield EmbeddedService(api, dicom_port, process, root / "data")
    finally:
        process.stop()


def c_echo(port: int, calling_aet: str = "CHECK") -> int:
    """One C-ECHO over a new association to the listener on ``port``: its status (-1: no association)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_aet)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="CTTRIAGE")
    if not assoc.is_established:
        return -1
    status = int(assoc.send_c_echo().Status)
    assoc.release()
    return status


def listener_pid(name: str) -> int:
    """The pid in a listener process's name (``app.liveness.listener_name``), which its heartbeat
    row and the instances it records (``received_by``) carry."""
    return int(name.rsplit(":", 1)[1])


def listener_children(parent_pid: int) -> set[int]:
    """The pids of the DICOM listener processes (``--listen-fd``) started by ``parent_pid``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == parent_pid and b"--listen-fd" in cmdline:
            found.add(int(entry.name))
    return found
