"""The service's children stop together (app.supervision.stop_all): every child is asked to stop
before any is waited for, and one that ignores the request is killed after the grace period."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from app.supervision import SupervisedProcess, stop_all
from tests.service_process import wait_until

#: A child that notes when SIGTERM reached it, takes a second to finish, and notes its exit.
SLOW_TO_STOP = """
import signal, sys, time
from pathlib import Path
log = Path(sys.argv[1])
def stop(*_):
    with log.open("a") as f:
        f.write(f"term {time.time()}\\n")
    time.sleep(1.0)
    with log.open("a") as f:
        f.write(f"exit {time.time()}\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
log.write_text("up\\n")
while True:
    time.sleep(0.1)
"""

#: A child that ignores SIGTERM.
DEAF = """
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGTERM, signal.SIG_IGN)
Path(sys.argv[1]).write_text("up\\n")
while True:
    time.sleep(0.1)
"""


def started(script: str, log: Path, name: str) -> SupervisedProcess:
    child = SupervisedProcess([sys.executable, "-c", script, str(log)], dict(os.environ), name=name)
    child.start()
    wait_until(lambda: log.exists() and log.read_text().startswith("up"), 30, f"{name} to start")
    return child


def events(log: Path) -> dict[str, float]:
    return {kind: float(at) for kind, at in (line.split() for line in log.read_text().splitlines()[1:])}


def test_every_child_is_asked_to_stop_before_any_is_waited_for(tmp_path: Path) -> None:
    logs = [tmp_path / f"child-{i}.log" for i in range(3)]
    children = [started(SLOW_TO_STOP, log, f"child {i}") for i, log in enumerate(logs)]
    stop_all(children)
    seen = [events(log) for log in logs]
    assert all(set(e) == {"term", "exit"} for e in seen), seen  # each stopped cleanly, none restarted
    last_asked = max(e["term"] for e in seen)
    first_done = min(e["exit"] for e in seen)
    assert last_asked < first_done, "a child was asked to stop only after another had finished"
    assert all(child.pid is not None and not _alive(child.pid) for child in children)


def test_a_child_that_ignores_the_stop_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    deaf = started(DEAF, tmp_path / "deaf.log", "deaf")
    polite = started(SLOW_TO_STOP, tmp_path / "polite.log", "polite")
    stop_all([deaf, polite], timeout=2.0)
    assert deaf.pid is not None and not _alive(deaf.pid)
    assert set(events(tmp_path / "polite.log")) == {"term", "exit"}


def _alive(pid: int) -> bool:
    """Whether ``pid`` is still a process (reaped children are gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
