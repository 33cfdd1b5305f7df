"""The long fault and abuse runs of issue 12, by hand, with figures.

Starts a production deployment (`cttriage dicom`, `cttriage api`, two `cttriage worker`) against
the local PostgreSQL and Redis (tests/deployment.py), then per round injects each fault once
(listener kill -9 mid-transfer, worker kill -9 mid-scoring, Redis stopped while studies arrive,
PostgreSQL restarted `-m immediate` while studies arrive) and runs the abuse cases (idle and
silent connections, 50 concurrent senders, a NUL in SeriesDescription, PixelSpacing 25 mm, an
oversize instance). Prints one row per case; exits 1 on any loss or failed expectation.

    python bench/abuse.py [--rounds N] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom
from pynetdicom import AE
from sqlalchemy import create_engine, func, select
from sqlalchemy.pool import NullPool

from app.db.models import Instance, Job, Result, Series, Study
from app.dicom.push import push_files
from tests.conftest import write_phantom_study
from tests.deployment import Deployment, start_deployment
from tests.harness_servers import (
    ensure_servers,
    flushed_redis,
    postgres_ctl,
    redis_down,
    redis_up,
    scratch_database,
)
from tests.service_process import wait_for_state, wait_until
from tests.test_faults import (
    HEARTBEAT,
    SLOW,
    SMALL,
    files_of,
    job_log_lines,
    push_like_a_pacs,
)

REDIS_DB = 13
TINY = {"slices": 40, "rows": 64, "columns": 64, "pixel_spacing": 6.0, "slice_spacing": 5.0}
MAX_INSTANCE_BYTES = 2 * 2**20
STATUS_OUT_OF_RESOURCES = 0xA700


@dataclass
class Row:
    case: str
    outcome: str = "?"
    recovery_s: float | None = None
    acknowledged: int = 0
    lost: int = 0
    scorings: str = "-"
    ok: bool = True
    notes: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, deployment: Deployment, work: Path) -> None:
        self.d = deployment
        self.work = work
        self.engine = create_engine(deployment.env["CTTRIAGE_DATABASE_URL"], pool_pre_ping=True, poolclass=NullPool)
        self.rows: list[Row] = []
        self.n = 0

    # --- helpers ---------------------------------------------------------------------------
    def phantom(self, spec: dict, **kwargs: object) -> tuple[Path, dict]:  # type: ignore[type-arg]
        self.n += 1
        folder = self.work / f"s{self.n}"
        truth = write_phantom_study(folder, seed=100 + self.n, **{"severity_left": 20.0, "severity_right": 8.0,
                                                                  **spec, **kwargs})
        return folder, truth

    def lost(self, sop_uids: set[str]) -> int:
        """Acknowledged instances without a row and a file."""
        with self.engine.connect() as conn:
            paths = dict(conn.execute(select(Instance.sop_instance_uid, Instance.path)
                                      .where(Instance.sop_instance_uid.in_(sop_uids))).all()) if sop_uids else {}
        storage = Path(self.d.env["CTTRIAGE_STORAGE_DIR"])
        return sum(1 for uid in sop_uids
                   if uid not in paths or not (Path(paths[uid]).is_file() or (storage / paths[uid]).is_file()))

    def scorings(self, study_uids: list[str]) -> tuple[str, bool]:
        """'study scored' log lines per (study, version); ok when each scored version has exactly one
        and exactly one result row."""
        counts: list[int] = []
        with self.engine.connect() as conn:
            for uid in study_uids:
                study_id = conn.execute(select(Study.id).where(Study.study_uid == uid)).scalar_one_or_none()
                if study_id is None:
                    continue
                jobs = conn.execute(select(Job.id, Job.study_version).where(Job.study_id == study_id)).all()
                per_version: dict[int, int] = {}
                for job_id, version in jobs:
                    per_version[version] = per_version.get(version, 0) + len(
                        job_log_lines(self.d, job_id, "study scored"))
                results = dict(conn.execute(select(Result.study_version, func.count()).where(
                    Result.study_id == study_id).group_by(Result.study_version)).all())
                for version, n in per_version.items():
                    if n or results.get(version):
                        counts.append(max(n, results.get(version, 0)))
        ok = all(c == 1 for c in counts)
        return ("/".join(map(str, counts)) or "0"), ok

    def finish(self, row: Row, study_uids: list[str], acknowledged: set[str]) -> None:
        row.acknowledged = len(acknowledged)
        row.lost = self.lost(acknowledged)
        row.scorings, ok = self.scorings(study_uids)
        if row.lost or not ok:
            row.ok = False

    def wait_scored(self, uids: list[str], timeout: float = 300) -> list[dict]:  # type: ignore[type-arg]
        return [wait_for_state(self.d.api, uid, timeout=timeout, logs=self.d.logs) for uid in uids]

    def instance_count(self, study_uid: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(Instance).join(Study).where(
                Study.study_uid == study_uid)).scalar() or 0)

    def run(self, name: str, case: Callable[[Row], None]) -> None:
        row = Row(name)
        began = time.monotonic()
        try:
            case(row)
        except Exception as exc:  # reported in the table, the run goes on
            row.ok = False
            row.outcome = f"ERROR {type(exc).__name__}"
            row.notes.append(str(exc).splitlines()[0][:200] if str(exc) else "")
            traceback.print_exc()
        row.notes.append(f"{time.monotonic() - began:.0f} s")
        self.rows.append(row)
        print(f"[{'ok' if row.ok else 'FAIL'}] {row.case}: {row.outcome} {'; '.join(row.notes)}", flush=True)

    # --- faults ----------------------------------------------------------------------------
    def listener_kill(self, row: Row) -> None:
        folder, truth = self.phantom(SMALL)
        uid = truth["study_instance_uid"]
        acked: dict[str, int] = {}
        errors: list[BaseException] = []

        def send() -> None:
            try:
                acked.update(push_like_a_pacs(files_of(folder), self.d.dicom_port))
            except BaseException as exc:
                errors.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
        wait_until(lambda: self.instance_count(uid) >= 10, 60, "instances to arrive", interval=0.05)
        self.d.processes["dicom"].kill(signal.SIGKILL)
        fault = time.monotonic()
        time.sleep(1)
        self.d.processes["dicom"].stop()
        self.d.start("dicom", "dicom")  # same name: the log file is appended to
        sender.join()
        if errors:
            raise errors[0]
        [study] = self.wait_scored([uid])
        row.recovery_s = time.monotonic() - fault
        row.outcome = f"{study['state']}, {study['instance_count']}/{truth['files']} instances"
        row.ok = study["state"] == "scored" and study["instance_count"] == truth["files"]
        self.finish(row, [uid], set(acked))

    def worker_kill(self, row: Row) -> None:
        folder, truth = self.phantom(SLOW, severity_left=30.0, severity_right=10.0)
        uid = truth["study_instance_uid"]
        acked = set(push_like_a_pacs(files_of(folder), self.d.dicom_port))

        def running_job() -> dict | None:  # type: ignore[type-arg]
            return next((j for j in self.d.study(uid).get("jobs", []) if j["state"] == "running"), None)

        job = wait_until(running_job, 180, "a worker to start scoring", interval=0.2, logs=self.d.logs)
        pid = int(re.match(r"cttriage-cpu-(\d+)@", job["worker"]).group(1))  # type: ignore[union-attr]
        [(name, victim)] = [(n, p) for n, p in self.d.processes.items() if p.proc and p.proc.pid == pid]
        time.sleep(1.0)  # mid-scoring
        victim.kill(signal.SIGKILL)
        fault = time.monotonic()
        [study] = self.wait_scored([uid])
        row.recovery_s = time.monotonic() - fault
        [final] = [j for j in study["jobs"] if j["id"] == job["id"]]
        row.outcome = f"{study['state']} by the other worker, job attempts {final['attempts']}"
        row.ok = (study["state"] == "scored" and row.recovery_s < 90 and final["worker"] != job["worker"])
        self.d.start(f"{name}-replacement-{int(time.time())}", "worker", "--device", "cpu")
        self.finish(row, [uid], acked)

    def redis_outage(self, row: Row) -> None:
        made = [self.phantom(SMALL) for _ in range(2)]
        uids = [t["study_instance_uid"] for _, t in made]
        acked: set[str] = set()
        redis_down()
        fault = time.monotonic()
        try:
            for folder, _ in made:
                acked |= set(push_like_a_pacs(files_of(folder), self.d.dicom_port))
            for uid in uids:
                wait_for_state(self.d.api, uid, states=("queued",), timeout=60, logs=self.d.logs)
            time.sleep(2)
        finally:
            redis_up()
        studies = self.wait_scored(uids)
        row.recovery_s = time.monotonic() - fault
        row.outcome = ", ".join(s["state"] for s in studies) + " (queued while Redis was down)"
        row.ok = all(s["state"] == "scored" for s in studies)
        self.finish(row, uids, acked)

    def postgres_outage(self, row: Row) -> None:
        made = [self.phantom(SMALL) for _ in range(3)]
        uids = [t["study_instance_uid"] for _, t in made]
        acked: dict[str, int] = {}
        errors: list[BaseException] = []

        def send(folder: Path) -> None:
            try:
                acked.update(push_like_a_pacs(files_of(folder), self.d.dicom_port))
            except BaseException as exc:
                errors.append(exc)

        senders = [threading.Thread(target=send, args=(folder,)) for folder, _ in made]
        for t in senders:
            t.start()
        time.sleep(0.5)
        postgres_ctl("restart", "-m", "immediate")  # a crash, as issue 12 ran it (test_faults: -m fast)
        fault = time.monotonic()
        for t in senders:
            t.join()
        if errors:
            raise errors[0]
        studies = self.wait_scored(uids)
        row.recovery_s = time.monotonic() - fault
        complete = sum(s["instance_count"] == t["files"] for s, (_, t) in zip(studies, made, strict=True))
        row.outcome = ", ".join(s["state"] for s in studies) + f"; {complete}/3 complete"
        row.ok = all(s["state"] == "scored" for s in studies) and complete == 3
        self.finish(row, uids, set(acked))

    # --- abuse -----------------------------------------------------------------------------
    def idle_and_silent(self, row: Row) -> None:
        folder, truth = self.phantom(TINY)
        silent = [socket.create_connection(("127.0.0.1", self.d.dicom_port)) for _ in range(10)]
        idle = []
        for _ in range(10):
            ae = AE(ae_title="IDLE")
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
            idle.append(ae.associate("127.0.0.1", self.d.dicom_port, ae_title="CTTRIAGE"))
        try:
            established = sum(a.is_established for a in idle)
            began = time.monotonic()
            statuses = push_files(files_of(folder), host="127.0.0.1", port=self.d.dicom_port)
            seconds = time.monotonic() - began
        finally:
            for a in idle:
                if a.is_established:
                    a.abort()
            for s in silent:
                s.close()
        acked = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                 for p, status in zip(files_of(folder), statuses, strict=True) if status == 0}
        row.recovery_s = seconds
        row.outcome = (f"{established}/10 idle held; {truth['files']}-instance study pushed in {seconds:.1f} s, "
                       f"{len(acked)} ok")
        row.ok = len(acked) == truth["files"] and seconds < 10
        self.wait_scored([truth["study_instance_uid"]])
        self.finish(row, [truth["study_instance_uid"]], acked)

    def fifty_senders(self, row: Row) -> None:
        folder, truth = self.phantom(SMALL, slices=50)
        files = files_of(folder)
        refusals = [0]
        failures = [0]
        acked: set[str] = set()
        times: list[float] = []
        lock = threading.Lock()
        start = threading.Event()
        began = time.monotonic()

        def send(path: Path) -> None:
            ds = pydicom.dcmread(path)
            start.wait()
            while time.monotonic() - began < 180:
                ae = AE(ae_title="PACS")
                ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
                assoc = ae.associate("127.0.0.1", self.d.dicom_port, ae_title="CTTRIAGE")
                if not assoc.is_established:
                    with lock:
                        refusals[0] += 1
                    time.sleep(0.5)
                    continue
                status = assoc.send_c_store(ds)
                assoc.release()
                if status is not None and status.get("Status") == 0:
                    with lock:
                        acked.add(str(ds.SOPInstanceUID))
                        times.append(time.monotonic() - began)
                    return
                with lock:
                    failures[0] += 1
                time.sleep(0.5)

        threads = [threading.Thread(target=send, args=(p,)) for p in files]
        for t in threads:
            t.start()
        began = time.monotonic()
        start.set()
        for t in threads:
            t.join()
        [study] = self.wait_scored([truth["study_instance_uid"]])
        row.recovery_s = max(times) if times else None
        row.outcome = (f"{len(acked)}/50 served, {refusals[0]} refused associations, {failures[0]} failed C-STOREs, "
                       f"last ack at {max(times or [0]):.1f} s; {study['state']}")
        row.ok = len(acked) == 50 and refusals[0] == 0 and failures[0] == 0
        self.finish(row, [truth["study_instance_uid"]], acked)

    def nul_series_description(self, row: Row) -> None:
        folder, truth = self.phantom(SMALL)
        for path in files_of(folder):
            ds = pydicom.dcmread(path)
            ds.SeriesDescription = "Lung\x00 1.0"
            ds.save_as(path)
        began = time.monotonic()
        acked = set(push_like_a_pacs(files_of(folder), self.d.dicom_port, deadline_s=60))
        [study] = self.wait_scored([truth["study_instance_uid"]])
        row.recovery_s = time.monotonic() - began
        with self.engine.connect() as conn:
            stored = conn.execute(select(Series.description).join(Study).where(
                Study.study_uid == truth["study_instance_uid"])).scalars().all()
        row.outcome = f"stored as {stored!r}, {study['state']}"
        row.ok = stored == ["Lung 1.0"] and study["state"] == "scored"
        self.finish(row, [truth["study_instance_uid"]], acked)

    def pixel_spacing_25(self, row: Row) -> None:
        folder, truth = self.phantom(TINY)
        for path in files_of(folder):
            ds = pydicom.dcmread(path)
            ds.PixelSpacing = ["25", "25"]
            ds.save_as(path)
        acked = set(push_like_a_pacs(files_of(folder), self.d.dicom_port, deadline_s=60))
        sent = time.monotonic()
        [study] = self.wait_scored([truth["study_instance_uid"]], timeout=120)
        row.recovery_s = time.monotonic() - sent
        jobs = study.get("jobs", [])
        job_s = jobs[-1].get("timings", {}).get("total") if jobs and isinstance(jobs[-1].get("timings"), dict) else None
        row.outcome = (f"{study['state']} {study.get('reason_code')} {row.recovery_s:.1f} s after the last ack "
                       f"(settle 2 s)" + (f", job {job_s:.2f} s" if isinstance(job_s, float) else ""))
        row.ok = (study["state"] == "rejected" and study.get("reason_code") == "ImplausiblePixelSpacingError"
                  and row.recovery_s < 10)
        self.finish(row, [truth["study_instance_uid"]], acked)

    def oversize_instance(self, row: Row) -> None:
        folder, _truth = self.phantom(TINY)
        ds = pydicom.dcmread(files_of(folder)[0])
        ds.Rows = ds.Columns = 1600
        ds.PixelData = bytes(1600 * 1600 * 2)  # 5 MB against a 2 MB limit
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        big = self.work / "big.dcm"
        ds.save_as(big)
        began = time.monotonic()
        statuses = push_files([big], host="127.0.0.1", port=self.d.dicom_port)
        seconds = time.monotonic() - began
        with self.engine.connect() as conn:
            rows = conn.execute(select(func.count()).select_from(Instance).where(
                Instance.sop_instance_uid == str(ds.SOPInstanceUID))).scalar()
        row.recovery_s = seconds
        row.outcome = f"{big.stat().st_size / 2**20:.1f} MB: status {[hex(s) for s in statuses]}, {rows} rows"
        row.ok = statuses == [STATUS_OUT_OF_RESOURCES] and rows == 0
        row.scorings = "-"


def print_table(rows: list[Row]) -> None:
    head = ("case", "ok", "outcome", "recovery s", "acked", "lost", "scorings")
    body = [(r.case, "yes" if r.ok else "NO", r.outcome, "-" if r.recovery_s is None else f"{r.recovery_s:.1f}",
             str(r.acknowledged), str(r.lost), r.scorings) for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    print(line.format(*head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for b in body:
        print(line.format(*b))
    print(f"total acknowledged {sum(r.acknowledged for r in rows)}, lost {sum(r.lost for r in rows)}")


def run_cases(root: Path, pg_url: str, redis_url: str, rounds: int) -> Bench:
    """Every fault ``rounds`` times, then the abuse cases, on one deployment (stopped at the end)."""
    (root / "deployment").mkdir(exist_ok=True)
    # Every sender here is 127.0.0.1, one peer: its limit is raised to the total (64) so the
    # idle, silent and 50-sender cases measure the listener, not the per-peer allowance (16).
    deployment = start_deployment(root / "deployment", pg_url, redis_url, workers=2, **HEARTBEAT,
                                  max_instance_bytes=str(MAX_INSTANCE_BYTES), dicom_max_associations_per_peer="64")
    bench = Bench(deployment, root / "studies")
    try:
        for r in range(1, rounds + 1):
            suffix = f" #{r}" if rounds > 1 else ""
            bench.run("listener kill -9 mid-transfer" + suffix, bench.listener_kill)
            bench.run("worker kill -9 mid-scoring" + suffix, bench.worker_kill)
            bench.run("Redis down while studies arrive" + suffix, bench.redis_outage)
            bench.run("PostgreSQL restart -m immediate" + suffix, bench.postgres_outage)
        bench.run("10 idle assoc + 10 silent TCP", bench.idle_and_silent)
        bench.run("50 concurrent senders", bench.fifty_senders)
        bench.run("NUL in SeriesDescription", bench.nul_series_description)
        bench.run("PixelSpacing 25 mm", bench.pixel_spacing_25)
        bench.run("5 MB instance, 2 MB limit", bench.oversize_instance)
    finally:
        deployment.stop()
        ensure_servers()  # a fault case may have left Redis or PostgreSQL down: the cleanup needs them
        bench.engine.dispose()
    return bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="times each fault is injected (default 1)")
    parser.add_argument("--out", type=Path, help="keep the deployment's logs and storage here (default: a temp dir)")
    args = parser.parse_args()
    root = args.out.resolve() if args.out else Path(tempfile.mkdtemp(prefix="cttriage-abuse-"))
    root.mkdir(parents=True, exist_ok=True)
    bench: Bench | None = None
    started = time.monotonic()
    ensure_servers()
    try:
        with scratch_database("cttriage_abuse") as pg_url, flushed_redis(REDIS_DB) as redis_url:
            bench = run_cases(root, pg_url, redis_url, args.rounds)
    finally:
        ensure_servers()
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    rows = bench.rows if bench else []
    print(f"\n{len(rows)} cases in {time.monotonic() - started:.0f} s, 2 workers, machine: {os.cpu_count()} CPUs")
    print_table(rows)
    failed = [r.case for r in rows if not r.ok or r.lost]
    if failed:
        print("FAILED: " + ", ".join(failed))
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
