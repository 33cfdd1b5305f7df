"""How Docker, systemd and Kubernetes stop `cttriage serve` (SIGTERM to the main process only), Ctrl-C
sent to the main process alone, and SIGKILL: none may leave a process of the service behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.service_process import ServiceProcess, cttriage, wait_healthy, wait_until


def _group_members(pgid: int) -> list[int]:
    """Live processes (not zombies) of a process group, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def _start(tmp_path: Path) -> ServiceProcess:
    api_port = free_port()
    env = {"CTTRIAGE_DATA_DIR": str(tmp_path / "data"), "CTTRIAGE_API_PORT": str(api_port),
           "CTTRIAGE_DICOM_PORT": str(free_port()), "CTTRIAGE_MIN_FREE_BYTES": "0"}
    process = ServiceProcess(cttriage("serve"), env, tmp_path / "service.log").start()
    wait_healthy(f"http://127.0.0.1:{api_port}", timeout=120, logs=process.log)
    # The worker child up and ready: its signal handlers are Celery's from here on.
    wait_until(lambda: " ready." in process.log(), 120, "the worker child", logs=process.log)
    assert process.proc is not None and len(_group_members(process.proc.pid)) >= 2
    return process


pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_stop_signal_to_serve_alone_stops_its_worker(tmp_path: Path, signum: signal.Signals) -> None:
    process = _start(tmp_path)
    assert process.proc is not None
    pid = process.proc.pid
    try:
        os.kill(pid, signum)  # the main process only, as `docker stop` and systemd do
        code = process.proc.wait(60)
        assert code == 0, process.log()[-3000:]
        assert _group_members(pid) == [], f"left running: {_group_members(pid)}\n{process.log()[-3000:]}"
        assert "Traceback" not in process.log(), process.log()[-3000:]
    finally:
        process.kill()
        process.stop()


def test_worker_exits_when_serve_is_killed(tmp_path: Path) -> None:
    """SIGKILL cannot be handled: the child notices its parent is gone and stops by itself."""
    process = _start(tmp_path)
    assert process.proc is not None
    pid = process.proc.pid
    try:
        os.kill(pid, signal.SIGKILL)
        process.proc.wait(10)
        started = time.monotonic()
        wait_until(lambda: not _group_members(pid), 30, "the orphaned worker to exit", logs=process.log)
        assert time.monotonic() - started < 30
    finally:
        process.kill()
        process.stop()
