"""Senders for the throughput benchmark: lanes that each push one study at a time over its own
association, as processes (not serialised on the benchmark's GIL) or threads, with a workaround for
pynetdicom's requestor race."""

from __future__ import annotations

import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import StudyFiles

#: (study UID, its files, the listener's port): what a lane is handed.
Job = tuple[str, list[str], int]


@dataclass
class PushLog:
    """What the senders reported: when each study's push started and finished, failures, and how
    often the requestor-race workaround put a response back."""

    rescued: int = 0
    started: dict[str, float] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _sender_init(workaround: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the pool
    _show_pynetdicom_warnings()
    if workaround:
        _patch_requestor_race()


#: C-STORE responses the requestor's reactor took off the queue and the workaround put back.
RESCUED_RESPONSES = 0


def _patch_requestor_race() -> None:
    """Work around a race in pynetdicom's requestor (seen with 3.0.4), in the senders only.

    ``Association.send_c_store`` pauses the association's reactor (``_reactor_checkpoint``,
    ``_is_paused``), sends the request and waits for the response on the DIMSE queue. The pause
    handshake is racy: the reactor can pass the checkpoint just before it is cleared and then
    take the C-STORE response off the queue itself (``_serve_request`` logs "Received unexpected
    C-STORE service message" and drops it), so the sender waits out the 30 s DIMSE timeout and
    the association aborts. Under load on 2 cores this hit about one C-STORE in a few thousand,
    against cttriage's listener and pynetdicom's own storescp alike. Here a response taken by the
    reactor of a requestor is put back on the queue for ``send_c_store`` to find.
    """
    from pynetdicom.association import Association

    if getattr(Association, "_bench_patched", False):
        return
    original = Association._serve_request

    def _serve_request(self: Any, msg: Any, context_id: int) -> None:
        global RESCUED_RESPONSES
        if self.is_requestor and msg is not None and not msg.is_valid_request and msg.msg_type == "C-STORE":
            RESCUED_RESPONSES += 1
            self.dimse.msg_queue.put((context_id, msg))
            return
        original(self, msg, context_id)

    Association._serve_request = _serve_request  # type: ignore[method-assign]
    Association._bench_patched = True  # type: ignore[attr-defined]


def _show_pynetdicom_warnings() -> None:
    """pynetdicom's warnings (e.g. "Received unexpected C-STORE service message") to stderr."""
    import logging

    logger = logging.getLogger("pynetdicom")
    if not any(getattr(h, "_bench", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._bench = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("sender %(process)d: pynetdicom %(levelname)s: %(message)s"))
        handler.setLevel(logging.WARNING)
        logger.addHandler(handler)


def _push_one(job: Job) -> dict[str, Any]:
    """Send one study over its own association (``app.dicom.push.push_files``); re-send it once on
    a failure (re-sends are idempotent). Runs in a sender process or thread."""
    from app.dicom.push import push_files

    uid, paths, port = job
    rescued0 = RESCUED_RESPONSES
    started = time.time()
    failures = []
    for _attempt in range(2):
        t0 = time.time()
        try:
            statuses = push_files([Path(p) for p in paths], host="127.0.0.1", port=port, calling_aet="BENCH_SCU")
            bad = [s for s in statuses if s != 0]
            if not bad:
                break
            failures.append(f"{uid}: {len(bad)} of {len(statuses)} C-STOREs failed after {time.time() - t0:.1f} s")
        except Exception as exc:  # association refused or aborted (a DIMSE timeout aborts it)
            failures.append(f"{uid}: {type(exc).__name__}: {exc} after {time.time() - t0:.1f} s")
    return {"uid": uid, "started": started, "finished": time.time(), "failures": failures,
            "rescued": RESCUED_RESPONSES - rescued0}


def _sender_main(conn: Any, workaround: bool) -> None:
    """A sender process: push the studies it is handed, one at a time, until its pipe closes."""
    _sender_init(workaround)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(_push_one(job))


class SenderPool:
    """``senders`` lanes, each sending one study at a time over its own association.

    Processes by default (``kind="processes"``: one forked process per lane, fed over its own
    pipe), so that the senders' CPU is not serialised on this process's GIL; or threads of this
    process. No ``multiprocessing.Pool``: terminating one whose workers hold its queue's lock
    hangs, and the benchmark must always be able to clean up.

    Either way pynetdicom's requestor is not reliable under load: now and then one C-STORE never
    gets its response and the association aborts after the 30 s DIMSE timeout (seen here with
    pynetdicom 3.0.4 against cttriage's listener and against pynetdicom's own storescp alike, from
    threads and from processes; dcmtk's storescu never did it). See
    :func:`_patch_requestor_race`, applied in the senders unless ``workaround`` is false.
    """

    def __init__(self, kind: str, senders: int, workaround: bool = True) -> None:
        import multiprocessing

        self.kind = kind
        self.senders = senders
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        if kind == "threads":
            _show_pynetdicom_warnings()
            if workaround:
                _patch_requestor_race()
            return
        ctx = multiprocessing.get_context("fork")
        for _ in range(senders):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_sender_main, args=(child, workaround), name="bench-sender", daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)

    def run(self, jobs: list[Job], on_outcome: Callable[[dict[str, Any]], None], stop: threading.Event) -> None:
        work: queue.Queue[Job] = queue.Queue()
        for job in jobs:
            work.put(job)

        def lane(i: int) -> None:
            while not stop.is_set():
                try:
                    job = work.get_nowait()
                except queue.Empty:
                    return
                if self.kind == "threads":
                    outcome = _push_one(job)
                else:
                    try:
                        self.conns[i].send(job)
                        outcome = self.conns[i].recv()
                    except (EOFError, OSError):  # the sender process is gone (cleanup)
                        return
                on_outcome(outcome)

        threads = [threading.Thread(target=lane, args=(i,), name=f"lane-{i}", daemon=True)
                   for i in range(self.senders)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)

    def close(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(5)
        for conn in self.conns:
            conn.close()


def push_all(studies: list[StudyFiles], port: int, pool: SenderPool, log: PushLog, stop: threading.Event) -> None:
    """Push every study through the sender pool; at most its size at once, one association per study."""

    def record(outcome: dict[str, Any]) -> None:
        with log.lock:
            log.started[outcome["uid"]] = outcome["started"]
            log.finished[outcome["uid"]] = outcome["finished"]
            log.failures.extend(outcome["failures"])
            log.rescued += outcome["rescued"]

    pool.run([(s.uid, [str(p) for p in s.paths], port) for s in studies], record, stop)

