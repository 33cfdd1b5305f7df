"""The SQLite write gate: one writer at a time across threads and processes, handed over at once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sqlalchemy import create_engine

from app.db.write_gate import SqliteWriteGate, write_gate_for


def test_a_waiting_writer_gets_its_turn_when_the_holder_is_done(tmp_path: Path) -> None:
    """Two gates on one file stand for two listener processes (flock is held per open file): the
    second waits while the first holds, and goes on as soon as it lets go, not after a sleep."""
    first, second = SqliteWriteGate(tmp_path / "db.sqlite"), SqliteWriteGate(tmp_path / "db.sqlite")
    turns: list[float] = []

    def write() -> None:
        with second.held():
            turns.append(time.monotonic())

    with first.held():
        waiting = threading.Thread(target=write)
        waiting.start()
        time.sleep(0.3)
        assert not turns  # still waiting
        released = time.monotonic()
    waiting.join(5)
    assert turns and turns[0] - released < 0.05
    first.close()
    second.close()


def test_threads_of_one_process_take_turns(tmp_path: Path) -> None:
    gate = SqliteWriteGate(tmp_path / "db.sqlite")
    inside = 0
    most = 0
    lock = threading.Lock()

    def write() -> None:
        nonlocal inside, most
        for _ in range(50):
            with gate.held():
                with lock:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0.0005)
                with lock:
                    inside -= 1

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert most == 1
    gate.close()
    with gate.held():  # closed (the listener stopped): a transaction still in flight goes ungated
        pass


def test_only_a_sqlite_file_gets_a_gate(tmp_path: Path) -> None:
    gate = write_gate_for(create_engine(f"sqlite:///{tmp_path / 'cttriage.sqlite'}"))
    assert gate is not None and gate.path == tmp_path / "cttriage.sqlite.write-gate"
    gate.close()
    assert write_gate_for(create_engine("sqlite://")) is None
    assert write_gate_for(create_engine("postgresql+psycopg://localhost/test")) is None
