"""End-to-end scoring throughput and latency of the production processes, by worker count.

A hand-run benchmark, not a test::

    python bench/throughput.py                       # 12 studies, workers 1 and 2
    python bench/throughput.py --studies 24 --workers 1,2,3 --out bench-throughput.json
    python bench/throughput.py --worker-mode processes   # W `worker --concurrency 1` processes

It needs the local PostgreSQL (127.0.0.1:5432, trust auth, admin database ``test``) and Redis
(127.0.0.1:6379) that the tests use (``scripts/services.sh`` starts them). It creates its own
database ``cttriage_bench_<hex>`` (migrated with Alembic, truncated between worker counts, dropped
at the end), uses Redis database 12 (flushed before, between and after) and a temporary folder
for the studies, storage and logs (``--keep DIR`` keeps them).

What it does:

1. Generates ``--studies`` phantom studies once (``models.phantom``; default 60 slices of
   256x256 at 1.4 mm pixels, 5 mm apart: 60 instances, 7.9 MB a study), each with its own UIDs,
   seed and severities (the worse lung spread over 0..80 %), plus warm-up and drain studies.
2. For each worker count W in ``--workers``: starts ``cttriage dicom``, ``cttriage api`` and the
   worker(s) as separate processes (each in its own process group) with
   ``CTTRIAGE_SETTLE_SECONDS`` (default 2 s) and ``CTTRIAGE_ASSEMBLER_INTERVAL_SECONDS`` (0.5 s).
   In the default ``--worker-mode prefork`` that is ONE ``cttriage worker --concurrency W``
   (Celery prefork pool; W=1 is the solo pool), in ``--worker-mode processes`` W separate
   ``cttriage worker --concurrency 1`` processes (solo pools; note they all get the same Celery
   node name, ``cttriage-cpu@<host>``, since ``cttriage worker`` has no option to change it).
   Then:

   * warm-up: W studies pushed and scored first, so that every worker process has imported
     numpy/scipy and opened its database pool (cold start is not measured);
   * end to end (the timed batch): all studies pushed by 4 concurrent senders (``--senders``),
     each study over its own association (``app.dicom.push.push_files``), while the poller reads
     ``/api/worklist`` every ``--poll`` s until every study is scored (or failed/rejected);
   * drain (``--no-drain`` skips it): as many other studies received by a listener whose settle
     time never ends, then a listener with the normal settle time queues them all in one pass and
     the warm workers empty the queue with no ingest competing: the workers' own throughput.

   Senders are processes by default (``--sender-kind``); see :class:`SenderPool` for why
   not threads.
3. Reads the database (``studies``, ``jobs``) and reports per worker count:

   * studies per minute: N / (last ``scored_at`` - first push started), and the same with the
     time the API first showed the last study scored;
   * per study latency from its last instance received (``studies.last_received_at``) to
     scored (``studies.scored_at``; and to first seen scored by the API poller), p50/p95/max.
     It contains the settle time (a study is only queued after ``settle_seconds`` without new
     instances, checked every assembler interval), so it is also reported minus
     ``settle_seconds`` and broken down: settle wait (last received -> job created), dispatch
     (-> on the broker), queue wait (-> worker started), job run (-> finished) and pure scoring
     (``jobs.timings.total``);
   * ingest time, the CPU seconds each component used in the timed window (PostgreSQL and Redis
     counted over all their clients, and whatever else ran on the machine), the most jobs that
     ran at once, and the largest severity error against the phantom truth (a sanity check).

   Percentiles are linear interpolations over N values; with N=12 the p95 is nearly the max.
   The scaling ratios are studies/min with W workers over studies/min with the first worker
   count, end to end and drain. ``--out`` writes everything (per-study rows included) as JSON.

All started processes are stopped (SIGTERM to their process group, then SIGKILL) on exit, Ctrl-C,
SIGTERM or error; the database is dropped and the Redis database flushed.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PG_URL_TEMPLATE = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
REDIS_HOST_URL = "redis://127.0.0.1:6379"
TERMINAL = ("scored", "failed", "rejected")
#: The benchmark's own admin key for the API it starts (CTTRIAGE_BOOTSTRAP_ADMIN_KEY).
API_KEY = f"bench_{uuid.uuid4().hex}"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- small helpers --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of the values; None when there are none."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def seconds(a: datetime | None, b: datetime | None) -> float | None:
    return None if a is None or b is None else (b - a).total_seconds()


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


T_START = time.monotonic()


def progress(message: str) -> None:
    """A timestamped progress line on stderr (the results go to stdout)."""
    print(f"[{time.monotonic() - T_START:7.1f} s] {message}", file=sys.stderr, flush=True)


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --- processes ------------------------------------------------------------------------------


@dataclass
class Proc:
    """A service process in its own process group, logging to a file."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: Any = None

    def start(self) -> Proc:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env={**os.environ, **self.env}, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        # Whatever is left in the group (prefork children, a hung parent) is killed.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if self._log:
            self._log.close()
            self._log = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def cttriage(*args: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", *args]


def cpu_snapshot() -> tuple[dict[int, float], dict[str, float]]:
    """CPU seconds (utime+stime+cutime+cstime) per process group, and of all PostgreSQL and Redis
    server processes (every client's, not only this benchmark's), from /proc."""
    groups: dict[int, float] = {}
    servers = {"postgres": 0.0, "redis": 0.0}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        # fields[0] is the state (field 3 of stat); pgrp is field 5, utime..cstime fields 14-17
        ticks = sum(int(x) for x in fields[11:15]) / CLK_TCK
        groups[int(fields[2])] = groups.get(int(fields[2]), 0.0) + ticks
        if comm.startswith("postgres"):
            servers["postgres"] += ticks
        elif comm.startswith("redis-server"):
            servers["redis"] += ticks
    return groups, servers


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return float(sum(parts) - idle), float(sum(parts))


def wait_quiet(max_wait: float, busy_below: float = 0.15, window: float = 5.0) -> float:
    """Wait (at most ``max_wait`` s) until the machine is under ``busy_below`` busy for a whole
    ``window``; returns the last window's busy fraction. Our own services are idle by then."""
    deadline = time.monotonic() + max_wait
    reported = False
    while True:
        m0 = machine_cpu()
        time.sleep(window)
        m1 = machine_cpu()
        busy = (m1[0] - m0[0]) / max(m1[1] - m0[1], 1.0)
        if busy < busy_below or time.monotonic() >= deadline:
            if reported or busy >= busy_below:
                progress(f"machine {100 * busy:.0f} % busy over {window:g} s; going on")
            return busy
        if not reported:
            progress(f"machine {100 * busy:.0f} % busy with other work; waiting up to {max_wait:.0f} s for it to "
                     f"fall under {100 * busy_below:.0f} %")
            reported = True


def self_cpu_seconds() -> float:
    """This benchmark's process group: the poller and the sender processes."""
    return cpu_snapshot()[0].get(os.getpgrp(), 0.0)


# --- studies --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyFiles:
    uid: str
    paths: list[Path]
    truth_left: float
    truth_right: float
    size_bytes: int


def severities(i: int, n: int) -> tuple[float, float]:
    """Varied severities: the worse lung spread over 0..80 %, the other one a fraction of it."""
    worst = 80.0 * i / max(n - 1, 1)
    other = worst * ((i * 37) % 5) / 8.0
    return (worst, other) if i % 2 == 0 else (other, worst)


def generate_studies(out: Path, n: int, *, slices: int, size: int, pixel_spacing: float, slice_spacing: float,
                     seed0: int, label: str) -> list[StudyFiles]:
    from models.phantom import PhantomSpec
    from models.phantom_dicom import write_phantom

    studies = []
    for i in range(n):
        left, right = severities(i, n)
        folder = out / f"{label}{i:03d}"
        spec = PhantomSpec(slices=slices, rows=size, columns=size, pixel_spacing=pixel_spacing,
                           slice_spacing=slice_spacing, severity_left=left, severity_right=right, seed=seed0 + i)
        truth = write_phantom(folder, spec, accession=f"BENCH{label.upper()}{i:04d}",
                              patient_id=f"BENCH{i:04d}")
        paths = sorted(folder.glob("*.dcm"))
        studies.append(StudyFiles(truth["study_instance_uid"], paths, float(truth["severity_left"]),
                                  float(truth["severity_right"]), sum(p.stat().st_size for p in paths)))
    if len({s.uid for s in studies}) != n:
        raise RuntimeError("generated studies do not have distinct UIDs")
    return studies


# --- pushing and polling ----------------------------------------------------------------------


@dataclass
class PushLog:
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

    Association._serve_request = _serve_request
    Association._bench_patched = True


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


def _push_one(job: tuple[str, list[str], int]) -> dict[str, Any]:
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

    def run(self, jobs: list[tuple[str, list[str], int]], on_outcome: Any, stop: threading.Event) -> None:
        work: queue.Queue[tuple[str, list[str], int]] = queue.Queue()
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


def poll_until_terminal(api: str, uids: set[str], interval: float, timeout: float,
                        processes: list[Proc], db_url: str) -> tuple[dict[str, float], dict[str, str]]:
    """Poll the worklist until every study in ``uids`` is terminal.

    Returns when the API first showed each study terminal (bench clock, epoch s) and its state.
    """
    seen: dict[str, float] = {}
    states: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    next_report = time.monotonic() + 15
    with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        while True:
            now = time.time()
            try:
                response = client.get(f"{api}/api/worklist", params={"limit": 500})
                if response.status_code in (401, 403):
                    raise RuntimeError(f"the API refused the benchmark's key: {response.text[:300]}")
                items = response.json()["items"]
            except (httpx.HTTPError, KeyError, ValueError):
                items = []
            for item in items:
                uid = item["study_uid"]
                if uid in uids and uid not in seen and item["state"] in TERMINAL:
                    seen[uid] = now
                    states[uid] = item["state"]
            if len(seen) == len(uids):
                return seen, states
            if time.monotonic() >= next_report:
                progress(f"  {len(seen)}/{len(uids)} studies scored (or failed/rejected) so far")
                next_report = time.monotonic() + 15
            dead = [p.name for p in processes if not p.alive()]
            if dead:
                raise RuntimeError(f"service process(es) exited during the run: {', '.join(dead)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(uids) - len(seen)} of {len(uids)} studies not terminal after "
                                   f"{timeout:.0f} s:\n{describe_stuck(db_url, uids - set(seen))}")
            time.sleep(interval)


def wait_ready(api: str, dicom_port: int, workers: list[Proc], processes: list[Proc], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    pending = {"api", "dicom", *(w.name for w in workers)}
    while pending:
        dead = [p.name for p in processes if not p.alive()]
        if dead:
            raise RuntimeError(f"process(es) exited while starting: {', '.join(dead)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not ready after {timeout:.0f} s: {', '.join(sorted(pending))}")
        if "api" in pending:
            try:
                if httpx.get(f"{api}/healthz", timeout=2).status_code == 200:
                    pending.discard("api")
            except httpx.HTTPError:
                pass
        if "dicom" in pending:
            try:
                with socket.create_connection(("127.0.0.1", dicom_port), timeout=1):
                    pending.discard("dicom")
            except OSError:
                pass
        for w in workers:
            if w.name in pending and " ready." in w.log():
                pending.discard(w.name)
        time.sleep(0.2)


# --- database -------------------------------------------------------------------------------


def server_epochs(db_url: str, redis_url: str) -> dict[str, str]:
    """When PostgreSQL and Redis last started: a change during a batch means a restart (another
    user of a shared machine, a fault test), and Redis here keeps no data across one, so tasks
    already handed to it are gone until the assembler re-queues them (processing timeout)."""
    import redis

    out: dict[str, str] = {}
    try:
        engine = create_engine(db_url)
        try:
            with engine.connect() as conn:
                out["postgres"] = str(conn.execute(text("SELECT pg_postmaster_start_time()")).scalar_one())
        finally:
            engine.dispose()
    except Exception as exc:  # down right now: that is the answer
        out["postgres"] = f"unreachable ({type(exc).__name__})"
    try:
        out["redis"] = str(redis.Redis.from_url(redis_url).info("server")["run_id"])
    except Exception as exc:
        out["redis"] = f"unreachable ({type(exc).__name__})"
    return out


def restarted(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [name for name in before if before[name] != after.get(name)]


def describe_stuck(db_url: str, uids: set[str]) -> str:
    """The studies of a batch that are not terminal, with their jobs: why a batch timed out."""
    try:
        rows = read_study_rows(db_url, sorted(uids))
    except Exception as exc:
        return f"(database unreadable: {type(exc).__name__})"
    lines = []
    for uid, row in rows.items():
        if row["state"] in TERMINAL:
            continue
        jobs = "; ".join(f"job {j['id']} {j['state']} attempts {j['attempts']} enqueued {j['enqueued_at']} "
                         f"started {j['started_at']}" for j in row["jobs"]) or "no job"
        lines.append(f"  {uid[-12:]}: {row['state']}, {row['instance_count']} instances; {jobs}")
    missing = len(uids) - len(rows)
    if missing:
        lines.append(f"  {missing} studies not in the database at all")
    return "\n".join(lines)


def create_database(admin_url: str) -> tuple[str, str]:
    from app.db.migrate import upgrade_to_head

    name = f"cttriage_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    url = PG_URL_TEMPLATE.format(name=name)
    upgrade_to_head(url)
    return name, url


def drop_database(admin_url: str, name: str) -> None:
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    finally:
        admin.dispose()


def truncate_all(url: str) -> None:
    """Empty every table but Alembic's, so each worker count starts from the same state."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            tables = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                                       "AND tablename <> 'alembic_version'")).scalars().all()
            if tables:
                conn.execute(text(f"TRUNCATE {', '.join(f'{t}' for t in tables)} RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()


def read_study_rows(url: str, uids: list[str]) -> dict[str, dict[str, Any]]:
    """Per study: its timestamps, state, scores, and its jobs (all versions)."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from app.db.models import Job, Study

    engine = create_engine(url)
    out: dict[str, dict[str, Any]] = {}
    try:
        with Session(engine) as session:
            for study in session.execute(select(Study).where(Study.study_uid.in_(uids))).scalars():
                jobs = session.execute(select(Job).where(Job.study_id == study.id).order_by(Job.id)).scalars().all()
                out[study.study_uid] = {
                    "state": study.state, "reason": study.reason, "version": study.version,
                    "instance_count": study.instance_count,
                    "first_received_at": study.first_received_at, "last_received_at": study.last_received_at,
                    "queued_at": study.queued_at, "scored_at": study.scored_at,
                    "severity_left": study.severity_left, "severity_right": study.severity_right,
                    "jobs": [{"id": j.id, "version": j.study_version, "state": j.state, "trigger": j.trigger,
                              "attempts": j.attempts, "worker": j.worker, "created_at": j.created_at,
                              "enqueued_at": j.enqueued_at, "started_at": j.started_at,
                              "finished_at": j.finished_at, "timings": j.timings, "error": j.error} for j in jobs],
                }
    finally:
        engine.dispose()
    return out


# --- one run ----------------------------------------------------------------------------------


@dataclass
class RunConfig:
    workers: int
    mode: str  # prefork or processes
    settle: float
    assembler_interval: float
    senders: int
    sender_kind: str
    poll: float
    timeout: float
    wait_quiet: float = 0.0


class CpuWindow:
    """CPU seconds used by each component (and the rest of the machine) between start() and end()."""

    def __init__(self, groups: dict[str, list[Proc]]) -> None:
        self.groups = groups

    def start(self) -> CpuWindow:
        self.t0 = time.time()
        self.snap0, self.bench0, self.machine0 = cpu_snapshot(), self_cpu_seconds(), machine_cpu()
        return self

    def end(self) -> tuple[dict[str, float], float, float]:
        """(CPU seconds per component, machine busy fraction, window seconds)."""
        snap1, bench1, machine1 = cpu_snapshot(), self_cpu_seconds(), machine_cpu()
        cpu = {k: round(sum(snap1[0].get(p.proc.pid, 0.0) - self.snap0[0].get(p.proc.pid, 0.0)  # type: ignore[union-attr]
                            for p in ps), 2) for k, ps in self.groups.items()}
        cpu["bench (senders, poller)"] = round(bench1 - self.bench0, 2)
        for server in ("postgres", "redis"):
            cpu[f"{server} (all clients)"] = round(snap1[1][server] - self.snap0[1][server], 2)
        busy_seconds = (machine1[0] - self.machine0[0]) / CLK_TCK
        cpu["everything else on the machine"] = round(max(busy_seconds - sum(cpu.values()), 0.0), 2)
        busy = (machine1[0] - self.machine0[0]) / max(machine1[1] - self.machine0[1], 1.0)
        return cpu, busy, time.time() - self.t0


def wait_listening(port: int, proc: Proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited while starting:\n{proc.log()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{proc.name} not listening on {port} after {timeout:.0f} s")


def run_once(cfg: RunConfig, studies: list[StudyFiles], warmups: list[StudyFiles], drain: list[StudyFiles],
             db_url: str, redis_url: str, workdir: Path, pool: SenderPool) -> dict[str, Any]:
    import redis

    run_dir = workdir / f"run-w{cfg.workers}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    truncate_all(db_url)
    redis.Redis.from_url(redis_url).flushdb()
    api_port, dicom_port = free_port(), free_port()
    env = {
        "CTTRIAGE_DATABASE_URL": db_url,
        "CTTRIAGE_BROKER_URL": redis_url,
        "CTTRIAGE_DATA_DIR": str(run_dir),
        "CTTRIAGE_STORAGE_DIR": str(run_dir / "storage"),
        "CTTRIAGE_API_HOST": "127.0.0.1",
        "CTTRIAGE_API_PORT": str(api_port),
        "CTTRIAGE_DICOM_HOST": "127.0.0.1",
        "CTTRIAGE_DICOM_PORT": str(dicom_port),
        "CTTRIAGE_SETTLE_SECONDS": str(cfg.settle),
        "CTTRIAGE_ASSEMBLER_INTERVAL_SECONDS": str(cfg.assembler_interval),
        "CTTRIAGE_MIN_FREE_BYTES": "0",
        # The API wants a key (Authorization: Bearer); the first start registers this one as admin.
        "CTTRIAGE_BOOTSTRAP_ADMIN_KEY": API_KEY,
    }
    (run_dir / "storage").mkdir()
    dicom = Proc("dicom", cttriage("dicom"), env, run_dir / "dicom.log")
    api = Proc("api", cttriage("api"), env, run_dir / "api.log")
    if cfg.mode == "prefork":
        workers = [Proc("worker", cttriage("worker", "--device", "cpu", "--concurrency", str(cfg.workers)), env,
                        run_dir / "worker.log")]
    else:
        workers = [Proc(f"worker{i + 1}", cttriage("worker", "--device", "cpu", "--concurrency", "1"), env,
                        run_dir / f"worker{i + 1}.log") for i in range(cfg.workers)]
    processes = [dicom, api, *workers]  # the live ones, watched while polling
    started: list[Proc] = []  # everything ever started, stopped at the end
    stop = threading.Event()
    drain_result: dict[str, Any] | None = None

    progress(f"workers={cfg.workers}: starting the services (logs in {run_dir})")

    def start(p: Proc) -> None:
        started.append(p)
        p.start()

    try:
        for p in processes:
            start(p)
        api_url = f"http://127.0.0.1:{api_port}"
        wait_ready(api_url, dicom_port, workers, processes)
        progress(f"workers={cfg.workers}: dicom, api and {len(workers)} worker process(es) ready; warm-up")

        # Warm-up: every worker process imports numpy/scipy and opens its pool before the timing.
        if warmups:
            wlog = PushLog()
            push_all(warmups, dicom_port, pool, wlog, stop)
            if wlog.failures:
                print(f"warning: warm-up push trouble: {wlog.failures[:3]}", file=sys.stderr)
            poll_until_terminal(api_url, {s.uid for s in warmups}, cfg.poll, cfg.timeout, processes, db_url)

        if cfg.wait_quiet:
            wait_quiet(cfg.wait_quiet)
        progress(f"workers={cfg.workers}: end-to-end batch of {len(studies)} studies")
        # The timed end-to-end window: pushes, settling and scoring all at once.
        epochs0 = server_epochs(db_url, redis_url)
        window = CpuWindow({"dicom": [dicom], "api": [api], "worker": workers}).start()
        log = PushLog()
        t_first_push = time.time()
        pusher = threading.Thread(target=push_all, args=(studies, dicom_port, pool, log, stop),
                                  name="pusher", daemon=True)
        pusher.start()
        seen, api_states = poll_until_terminal(api_url, {s.uid for s in studies}, cfg.poll, cfg.timeout, processes,
                                               db_url)
        while pusher.is_alive():
            pusher.join(0.2)
        cpu, busy, wall = window.end()
        e2e_restarts = restarted(epochs0, server_epochs(db_url, redis_url))

        if drain:
            # Drain: the same number of studies received first with a settle time that never ends, then
            # a listener with the normal settle time queues them all in one pass and the (warm) workers
            # empty the queue with nothing else to do: the workers' own throughput, without ingest.
            if cfg.wait_quiet:
                wait_quiet(cfg.wait_quiet)
            progress(f"workers={cfg.workers}: drain batch of {len(drain)} studies")
            dicom.stop()
            processes.remove(dicom)
            hold = Proc("dicom-hold", cttriage("dicom"), {**env, "CTTRIAGE_SETTLE_SECONDS": "86400"},
                        run_dir / "dicom-hold.log")
            start(hold)
            processes.append(hold)
            wait_listening(dicom_port, hold)
            dlog = PushLog()
            push_all(drain, dicom_port, pool, dlog, stop)
            if dlog.failures:
                print(f"warning: drain push trouble: {dlog.failures[:3]}", file=sys.stderr)
            hold.stop()
            processes.remove(hold)
            release = Proc("dicom-release", cttriage("dicom"), env, run_dir / "dicom-release.log")
            depochs0 = server_epochs(db_url, redis_url)
            dwindow = CpuWindow({"dicom": [release], "api": [api], "worker": workers}).start()
            start(release)
            processes.append(release)
            poll_until_terminal(api_url, {s.uid for s in drain}, cfg.poll, cfg.timeout, processes, db_url)
            dcpu, dbusy, dwall = dwindow.end()
            drain_result = summarise_drain(read_study_rows(db_url, [s.uid for s in drain]), drain, dcpu, dbusy,
                                           dwall)
            drain_result["servers_restarted"] = restarted(depochs0, server_epochs(db_url, redis_url))
    except BaseException as exc:
        stop.set()
        for p in started if isinstance(exc, Exception) else []:
            tail = p.log()[-2500:]
            if tail:
                print(f"--- {p.name} log tail ({p.log_path})\n{tail}", file=sys.stderr)
        raise
    finally:
        for p in reversed(started):
            p.stop()

    if log.failures:
        print(f"warning: {len(log.failures)} push failures, first: {log.failures[0]}", file=sys.stderr)
    rows = read_study_rows(db_url, [s.uid for s in studies])
    truth = {s.uid: s for s in studies}
    result = summarise(cfg, studies, rows, truth, log, seen, api_states, t_first_push, wall, cpu, busy, run_dir)
    result["drain"] = drain_result
    result["servers_restarted"] = e2e_restarts
    return result


def peak_concurrency(rows: dict[str, dict[str, Any]]) -> int:
    """Most jobs running at once, from the jobs' started/finished times."""
    events = []
    for row in rows.values():
        for j in row["jobs"]:
            if j["started_at"] and j["finished_at"]:
                events += [(j["started_at"], 1), (j["finished_at"], -1)]
    running = peak = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        running += d
        peak = max(peak, running)
    return peak


def summarise_drain(rows: dict[str, dict[str, Any]], studies: list[StudyFiles], cpu: dict[str, float], busy: float,
                    wall: float) -> dict[str, Any]:
    jobs = [row["jobs"][-1] for row in rows.values() if row["jobs"]]
    scored = [row for row in rows.values() if row["state"] == "scored"]
    first_queued = min((j["created_at"] for j in jobs), default=None)
    last_queued = max((j["created_at"] for j in jobs), default=None)
    last_scored = max((row["scored_at"] for row in scored), default=None)
    span = seconds(first_queued, last_scored)
    metrics = {}
    for key, values in {
        "queue_wait_s": [seconds(j["enqueued_at"], j["started_at"]) for j in jobs],
        "job_run_s": [seconds(j["started_at"], j["finished_at"]) for j in jobs],
        "scoring_total_s": [(j["timings"] or {}).get("total") for j in jobs],
    }.items():
        vals = [v for v in values if v is not None]
        metrics[key] = {"p50": pct(vals, 50), "p95": pct(vals, 95), "max": max(vals, default=None), "n": len(vals)}
    return {
        "studies": len(studies),
        "scored": len(scored),
        "queued_within_s": seconds(first_queued, last_queued),
        "span_s": span,
        "studies_per_min": len(studies) * 60.0 / span if span else None,
        "metrics": metrics,
        "scoring_seconds_sum": round(sum((j["timings"] or {}).get("total") or 0.0 for j in jobs), 2),
        "peak_concurrent_jobs": peak_concurrency(rows),
        "cpu_seconds_in_window": cpu,
        "window_seconds": round(wall, 2),
        "machine_cpu_busy": round(busy, 3),
    }


def summarise(cfg: RunConfig, studies: list[StudyFiles], rows: dict[str, dict[str, Any]],
              truth: dict[str, StudyFiles], log: PushLog, seen: dict[str, float], api_states: dict[str, str],
              t_first_push: float, wall: float, cpu: dict[str, float], busy: float, run_dir: Path) -> dict[str, Any]:
    t0 = utc(t_first_push)
    per_study = []
    for s in studies:
        row = rows.get(s.uid)
        if row is None:
            per_study.append({"study_uid": s.uid, "state": "missing"})
            continue
        jobs = row["jobs"]
        last_job = jobs[-1] if jobs else {}
        rec = {
            "study_uid": s.uid,
            "state": row["state"],
            "reason": row["reason"],
            "version": row["version"],
            "jobs": len(jobs),
            "instances": row["instance_count"],
            "expected_instances": len(s.paths),
            "push_started_s": round(log.started.get(s.uid, float("nan")) - t_first_push, 3),
            "push_finished_s": round(log.finished.get(s.uid, float("nan")) - t_first_push, 3),
            "last_received_s": seconds(t0, row["last_received_at"]),
            "scored_s": seconds(t0, row["scored_at"]),
            "api_seen_s": round(seen[s.uid] - t_first_push, 3) if s.uid in seen else None,
            "latency_s": seconds(row["last_received_at"], row["scored_at"]),
            "latency_api_s": (seen[s.uid] - row["last_received_at"].timestamp()) if s.uid in seen else None,
            "settle_wait_s": seconds(row["last_received_at"], last_job.get("created_at")),
            "dispatch_s": seconds(last_job.get("created_at"), last_job.get("enqueued_at")),
            "queue_wait_s": seconds(last_job.get("enqueued_at"), last_job.get("started_at")),
            "job_run_s": seconds(last_job.get("started_at"), last_job.get("finished_at")),
            "scoring_total_s": (last_job.get("timings") or {}).get("total"),
            "timings": last_job.get("timings"),
            "worker": last_job.get("worker"),
            "severity_error": (max(abs(row["severity_left"] - s.truth_left), abs(row["severity_right"] - s.truth_right))
                               if row["severity_left"] is not None else None),
        }
        rec["latency_minus_settle_s"] = None if rec["latency_s"] is None else rec["latency_s"] - cfg.settle
        per_study.append(rec)

    def col(key: str) -> list[float]:
        return [r[key] for r in per_study if r.get(key) is not None]

    scored = [r for r in per_study if r.get("state") == "scored"]
    last_scored = max(col("scored_s"), default=None)
    last_seen = max(col("api_seen_s"), default=None)
    pushed_end = max((v for v in log.finished.values()), default=t_first_push) - t_first_push
    n = len(studies)
    instances = sum(len(s.paths) for s in studies)
    size = sum(s.size_bytes for s in studies)

    peak = peak_concurrency({uid: row for uid, row in rows.items() if uid in truth})

    metrics = {}
    for key in ("latency_s", "latency_minus_settle_s", "latency_api_s", "settle_wait_s", "dispatch_s",
                "queue_wait_s", "job_run_s", "scoring_total_s"):
        values = col(key)
        metrics[key] = {"p50": pct(values, 50), "p95": pct(values, 95), "max": max(values, default=None),
                        "n": len(values)}
    scoring_sum = sum(col("scoring_total_s"))
    return {
        "workers": cfg.workers,
        "worker_mode": cfg.mode,
        "worker_processes": (f"1 x `cttriage worker --concurrency {cfg.workers}`" if cfg.mode == "prefork"
                             else f"{cfg.workers} x `cttriage worker --concurrency 1`"),
        "settle_seconds": cfg.settle,
        "assembler_interval_seconds": cfg.assembler_interval,
        "senders": cfg.senders,
        "sender_kind": cfg.sender_kind,
        "studies": n,
        "scored": len(scored),
        "not_scored": [{"study_uid": r["study_uid"], "state": r.get("state"), "reason": r.get("reason")}
                       for r in per_study if r.get("state") != "scored"],
        "reopened_studies": sum(1 for r in per_study if (r.get("version") or 1) > 1 or (r.get("jobs") or 1) > 1),
        "instances": instances,
        "megabytes": round(size / 1e6, 1),
        "push_failures": log.failures,
        "scu_responses_rescued": log.rescued,
        "ingest_seconds": round(pushed_end, 3),
        "ingest_instances_per_s": round(instances / pushed_end, 1) if pushed_end > 0 else None,
        "makespan_scored_s": last_scored,
        "makespan_api_s": last_seen,
        "studies_per_min": (n * 60.0 / last_scored) if last_scored else None,
        "studies_per_min_api": (n * 60.0 / last_seen) if last_seen else None,
        "metrics": metrics,
        "scoring_seconds_sum": round(scoring_sum, 2),
        "peak_concurrent_jobs": peak,
        "cpu_seconds_in_window": cpu,
        "window_seconds": round(wall, 2),
        "machine_cpu_busy": round(busy, 3),
        "cpus": os.cpu_count(),
        "max_severity_error": max(col("severity_error"), default=None),
        "logs": str(run_dir),
        "per_study": per_study,
    }


# --- report -----------------------------------------------------------------------------------


def fmt(v: float | None, width: int = 7, digits: int = 2) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"


def print_run(r: dict[str, Any]) -> None:
    print(f"\n=== workers={r['workers']}: {r['worker_processes']}; settle {r['settle_seconds']:g} s, "
          f"assembler every {r['assembler_interval_seconds']:g} s, {r['senders']} sender {r['sender_kind']}")
    print(f"studies {r['studies']} ({r['instances']} instances, {r['megabytes']} MB): scored {r['scored']}"
          + (f", NOT scored {r['not_scored']}" if r["not_scored"] else "")
          + (f", reopened {r['reopened_studies']}" if r["reopened_studies"] else ""))
    if r.get("servers_restarted"):
        print(f"WARNING: {' and '.join(r['servers_restarted'])} restarted during this batch: not a clean measurement")
    print(f"ingest (first push -> last push answered): {r['ingest_seconds']:.1f} s, "
          f"{r['ingest_instances_per_s']} instances/s"
          + (f"; {len(r['push_failures'])} PUSH FAILURES (re-sent once), first: {r['push_failures'][0]}"
             if r["push_failures"] else "")
          + (f"; pynetdicom requestor race hit {r['scu_responses_rescued']} times (response put back)"
             if r["scu_responses_rescued"] else ""))
    print(f"throughput: {fmt(r['studies_per_min'], 0, 1)} studies/min (last scored_at {r['makespan_scored_s']:.1f} s "
          f"after first push); API-visible {fmt(r['studies_per_min_api'], 0, 1)} studies/min "
          f"({r['makespan_api_s']:.1f} s)")
    print(f"\n  {'per study (seconds)':<46} {'p50':>7} {'p95':>7} {'max':>7}")
    labels = {
        "latency_s": "latency last received -> scored_at",
        "latency_minus_settle_s": "  same minus settle",
        "latency_api_s": "latency last received -> API showed scored",
        "settle_wait_s": "  settle wait (last received -> queued)",
        "dispatch_s": "  dispatch (queued -> on the broker)",
        "queue_wait_s": "  queue wait (on the broker -> worker started)",
        "job_run_s": "  job run (started -> finished)",
        "scoring_total_s": "  pure scoring (jobs.timings.total)",
    }
    for key, label in labels.items():
        m = r["metrics"][key]
        print(f"  {label:<46} {fmt(m['p50'])} {fmt(m['p95'])} {fmt(m['max'])}")
    cpu = ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_seconds_in_window"].items())
    print(f"\n  CPU seconds in the {r['window_seconds']:.1f} s window: {cpu}; machine busy "
          f"{100 * r['machine_cpu_busy']:.0f} % of {r['cpus']} CPUs")
    print(f"  scoring seconds summed {r['scoring_seconds_sum']:.1f}; most jobs running at once "
          f"{r['peak_concurrent_jobs']}; largest severity error vs truth {fmt(r['max_severity_error'], 0)} pp")
    d = r.get("drain")
    if d:
        m = d["metrics"]
        print(f"\n  drain (all {d['studies']} queued within {d['queued_within_s']:.2f} s, no ingest running): "
              f"{fmt(d['studies_per_min'], 0, 1)} studies/min over {d['span_s']:.1f} s (first queued -> last scored), "
              f"scored {d['scored']}")
        print(f"    job run p50/p95 {fmt(m['job_run_s']['p50'], 0)}/{fmt(m['job_run_s']['p95'], 0)} s, pure scoring "
              f"p50/p95 {fmt(m['scoring_total_s']['p50'], 0)}/{fmt(m['scoring_total_s']['p95'], 0)} s, "
              f"most jobs at once {d['peak_concurrent_jobs']}")
        if d.get("servers_restarted"):
            print(f"    WARNING: {' and '.join(d['servers_restarted'])} restarted during the drain")
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in d["cpu_seconds_in_window"].items())
        print(f"    CPU seconds in the {d['window_seconds']:.1f} s window: {cpu}; machine busy "
              f"{100 * d['machine_cpu_busy']:.0f} %")


def print_summary(results: list[dict[str, Any]]) -> None:
    base = results[0]
    print(f"\n{'workers':>7} {'studies/min':>11} {'(API)':>7} {'scale':>6} {'lat p50':>8} {'lat p95':>8} "
          f"{'-settle p50':>11} {'-settle p95':>11} {'score p50':>9} {'score p95':>9} {'busy':>5}")
    for r in results:
        m = r["metrics"]
        ratio = (r["studies_per_min"] / base["studies_per_min"]) if base["studies_per_min"] else None
        print(f"{r['workers']:>7} {fmt(r['studies_per_min'], 11, 1)} {fmt(r['studies_per_min_api'], 7, 1)} "
              f"{fmt(ratio, 6)} {fmt(m['latency_s']['p50'], 8)} {fmt(m['latency_s']['p95'], 8)} "
              f"{fmt(m['latency_minus_settle_s']['p50'], 11)} {fmt(m['latency_minus_settle_s']['p95'], 11)} "
              f"{fmt(m['scoring_total_s']['p50'], 9)} {fmt(m['scoring_total_s']['p95'], 9)} "
              f"{100 * r['machine_cpu_busy']:>4.0f}%")
    for r in results[1:]:
        if base["studies_per_min"] and r["studies_per_min"]:
            print(f"scaling {r['workers']} workers / {base['workers']} worker(s), end to end: "
                  f"{r['studies_per_min'] / base['studies_per_min']:.2f}x studies/min")
    if all(r.get("drain") for r in results):
        print(f"\n{'workers':>7} {'drain studies/min':>17} {'scale':>6} {'score p50':>9} {'score p95':>9} "
              f"{'job p50':>8} {'busy':>5}")
        b = base["drain"]["studies_per_min"]
        for r in results:
            d = r["drain"]
            ratio = d["studies_per_min"] / b if b and d["studies_per_min"] else None
            print(f"{r['workers']:>7} {fmt(d['studies_per_min'], 17, 1)} {fmt(ratio, 6)} "
                  f"{fmt(d['metrics']['scoring_total_s']['p50'], 9)} {fmt(d['metrics']['scoring_total_s']['p95'], 9)} "
                  f"{fmt(d['metrics']['job_run_s']['p50'], 8)} {100 * d['machine_cpu_busy']:>4.0f}%")


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=12, help="studies in the timed batch (default 12)")
    parser.add_argument("--slices", type=int, default=60, help="slices per study (default 60)")
    parser.add_argument("--size", type=int, default=256, help="rows and columns (default 256)")
    parser.add_argument("--pixel-spacing", type=float, default=1.4, help="mm (default 1.4)")
    parser.add_argument("--slice-spacing", type=float, default=5.0, help="mm (default 5)")
    parser.add_argument("--workers", default="1,2", help="worker counts to run, comma-separated (default 1,2)")
    parser.add_argument("--worker-mode", choices=("prefork", "processes"), default="prefork",
                        help="prefork: one `worker --concurrency W` (default); processes: W `--concurrency 1`")
    parser.add_argument("--settle", type=float, default=2.0, help="CTTRIAGE_SETTLE_SECONDS (default 2)")
    parser.add_argument("--assembler-interval", type=float, default=0.5,
                        help="CTTRIAGE_ASSEMBLER_INTERVAL_SECONDS (default 0.5)")
    parser.add_argument("--senders", type=int, default=4, help="concurrent senders (default 4)")
    parser.add_argument("--sender-kind", choices=("processes", "threads"), default="processes",
                        help="senders are processes (default) or threads of this process (see SenderPool)")
    parser.add_argument("--poll", type=float, default=0.25, help="API poll interval, s (default 0.25)")
    parser.add_argument("--scu-race-workaround", action=argparse.BooleanOptionalAction, default=True,
                        help="in the senders, put back C-STORE responses pynetdicom's requestor reactor "
                             "took by mistake (see _patch_requestor_race; default: on)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up studies before each timed batch (default: the worker count; 0: none)")
    parser.add_argument("--drain", action=argparse.BooleanOptionalAction, default=True,
                        help="after the end-to-end batch, also time the workers emptying a queue of --studies "
                             "studies received beforehand (default: on)")
    parser.add_argument("--timeout", type=float, default=300, help="per batch, s (default 300)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each timed batch, wait up to this long for the machine to be under 15 %% "
                             "busy (a shared machine; default 0: do not wait)")
    parser.add_argument("--pg-admin-url", default=PG_ADMIN_URL)
    parser.add_argument("--redis-db", type=int, default=12)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--keep", type=Path, help="keep studies, storage and logs in this folder")
    args = parser.parse_args(argv)
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    if not worker_counts or min(worker_counts) < 1:
        parser.error("--workers needs positive integers")

    # The sender processes fork now, before this process has threads or connections.
    pool = SenderPool(args.sender_kind, args.senders, args.scu_race_workaround)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    redis_url = f"{REDIS_HOST_URL}/{args.redis_db}"
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    tmp = tempfile.TemporaryDirectory(prefix="cttriage-bench-")
    workdir = args.keep or Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    db_name: str | None = None
    results: list[dict[str, Any]] = []
    try:
        started = time.perf_counter()
        geometry = dict(slices=args.slices, size=args.size, pixel_spacing=args.pixel_spacing,
                        slice_spacing=args.slice_spacing)
        studies = generate_studies(workdir / "studies", args.studies, seed0=1000, label="s", **geometry)
        n_warm = max(worker_counts) if args.warmup is None else args.warmup
        warmups = generate_studies(workdir / "warmup", n_warm, seed0=9000, label="w", **geometry) if n_warm else []
        drain = (generate_studies(workdir / "drain", args.studies, seed0=5000, label="d", **geometry)
                 if args.drain else [])
        mb = sum(s.size_bytes for s in studies) / 1e6
        print(f"generated {len(studies)} studies ({args.slices} slices {args.size}x{args.size}, "
              f"{args.pixel_spacing} mm pixels, {args.slice_spacing} mm apart; {mb:.1f} MB) and {len(warmups)} "
              f"warm-up and {len(drain)} drain studies in {time.perf_counter() - started:.1f} s; {os.cpu_count()} CPUs")
        db_name, db_url = create_database(args.pg_admin_url)
        print(f"database {db_name}, broker {redis_url}, work folder {workdir}")
        for w in worker_counts:
            cfg = RunConfig(workers=w, mode=args.worker_mode, settle=args.settle,
                            assembler_interval=args.assembler_interval, senders=args.senders,
                            sender_kind=args.sender_kind, poll=args.poll, wait_quiet=args.wait_quiet,
                            timeout=args.timeout)
            result = run_once(cfg, studies, warmups[: (w if args.warmup is None else n_warm)], drain, db_url,
                              redis_url, workdir, pool)
            results.append(result)
            print_run(result)
            if not args.keep:
                shutil.rmtree(workdir / f"run-w{w}" / "storage", ignore_errors=True)
        print_summary(results)
        if args.out:
            payload = {"argv": sys.argv, "args": {k: str(v) for k, v in vars(args).items()},
                       "started": datetime.now(UTC).isoformat(), "runs": results}
            args.out.write_text(json.dumps(payload, indent=2, default=str))
            print(f"\nwrote {args.out}")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        pool.close()
        try:
            redis.Redis.from_url(redis_url).flushdb()
        except Exception as exc:  # pragma: no cover - report, keep cleaning
            print(f"could not flush {redis_url}: {exc}", file=sys.stderr)
        if db_name:
            try:
                drop_database(args.pg_admin_url, db_name)
            except Exception as exc:  # pragma: no cover
                print(f"could not drop database {db_name}: {exc}", file=sys.stderr)
        if not args.keep:
            tmp.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
