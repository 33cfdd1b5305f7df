"""Fault tests on the production path (real PostgreSQL, Redis and Celery worker processes):
a worker killed mid-scoring, Redis down while studies arrive, PostgreSQL restarted under load,
and one study sent twice at once. Nothing acknowledged may be lost; every study is scored once.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import create_engine, func, select

from app.db.models import Instance, Result, Study
from app.dicom.push import push_files
from tests.conftest import write_phantom_study
from tests.deployment import Deployment, start_deployment
from tests.harness_servers import postgres_ctl, redis_down, redis_up
from tests.service_process import API, wait_for_state, wait_until

SMALL = {"slices": 40, "rows": 160, "columns": 160, "pixel_spacing": 2.2, "slice_spacing": 7.0}
#: Big enough that scoring takes seconds on 2 cores, so a worker can be killed in the middle.
SLOW = {"slices": 120, "rows": 448, "columns": 448, "pixel_spacing": 0.8, "slice_spacing": 2.6}
#: Recovery must not wait for the processing timeout (left at its default, 30 min): a worker's
#: heartbeat and an unclaimed message's re-send bring a job back (shortened here to fit a test).
HEARTBEAT = {"job_heartbeat_interval_seconds": "2", "job_heartbeat_timeout_seconds": "15",
             "enqueued_resend_seconds": "20"}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, pg_url: str, redis_url: str) -> Iterator[Deployment]:
    deployment = start_deployment(tmp_path_factory.mktemp("faults"), pg_url, redis_url, workers=2, **HEARTBEAT)
    yield deployment
    deployment.stop()


def files_of(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def push_like_a_pacs(files: list[Path], port: int, deadline_s: float = 180.0) -> dict[str, int]:
    """Send every file, retrying failures (a status other than success, or no association) the
    way a PACS does. Returns the SOP Instance UIDs acknowledged with success."""
    acknowledged: dict[str, int] = {}
    pending = list(files)
    deadline = time.monotonic() + deadline_s
    while pending and time.monotonic() < deadline:
        ae = AE(ae_title="PACS")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="CTTRIAGE")
        if not assoc.is_established:
            time.sleep(0.5)
            continue
        retry = []
        for path in pending:
            ds = pydicom.dcmread(path)
            status = assoc.send_c_store(ds) if assoc.is_established else None
            if status is not None and status.get("Status") == 0:
                acknowledged[str(ds.SOPInstanceUID)] = 0
            else:
                retry.append(path)
        if assoc.is_established:
            assoc.release()
        pending = retry
        if pending:
            time.sleep(0.5)
    assert not pending, f"{len(pending)} instances never stored"
    return acknowledged


def push_at_once(folders: list[Path], port: int, during: Callable[[], None]) -> dict[str, int]:
    """One sender per folder (``push_like_a_pacs``) at once, ``during`` called while they run.
    Returns every SOP Instance UID acknowledged with success; a sender's error fails the test."""
    acknowledged: dict[str, int] = {}
    errors: list[BaseException] = []

    def send(folder: Path) -> None:
        try:
            acknowledged.update(push_like_a_pacs(files_of(folder), port))
        except BaseException as exc:  # reported below
            errors.append(exc)

    senders = [threading.Thread(target=send, args=(folder,)) for folder in folders]
    for t in senders:
        t.start()
    during()
    for t in senders:
        t.join()
    assert not errors, errors
    return acknowledged


def one_result(deployment: Deployment, uid: str) -> dict:  # type: ignore[type-arg]
    study = wait_for_state(deployment.api, uid, logs=deployment.logs, timeout=300)
    assert study["state"] == "scored", study
    assert len(study["results"]) == 1, study["results"]
    return study


def test_same_study_from_two_associations_at_once(deployment: Deployment, tmp_path: Path) -> None:
    truth = write_phantom_study(tmp_path, severity_left=22.0, severity_right=9.0, seed=41, **SMALL)
    files = files_of(tmp_path)
    statuses: list[list[int]] = []
    senders = [threading.Thread(target=lambda: statuses.append(push_files(files, host="127.0.0.1",
                                                                          port=deployment.dicom_port)))
               for _ in range(2)]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    assert [set(s) for s in statuses] == [{0}, {0}]
    study = one_result(deployment, truth["study_instance_uid"])
    assert study["instance_count"] == len(files)
    assert abs(study["severity_left"] - truth["severity_left"]) <= 3.0


def job_log_lines(deployment: Deployment, job_id: int, message: str) -> list[dict]:  # type: ignore[type-arg]
    """The workers' JSON log lines with ``message`` about ``job_id`` (their whole logs)."""
    lines = []
    for name, process in deployment.processes.items():
        for line in process.log().splitlines():
            if message in line and line.startswith("{"):
                record = json.loads(line)
                if record.get("message") == message and record.get("job_id") == job_id:
                    lines.append({**record, "process": name})
    return lines


def test_worker_killed_mid_scoring_is_scored_once_by_another(deployment: Deployment, tmp_path: Path) -> None:
    """The survivor takes the job over once the victim's heartbeat is silent (15 s here; about a
    minute by default), not after the processing timeout; exactly one scoring runs after the
    kill, even when Celery later hands the victim's unacknowledged message out again."""
    truth = write_phantom_study(tmp_path, severity_left=30.0, severity_right=10.0, seed=42, **SLOW)
    uid = truth["study_instance_uid"]
    assert set(push_files(files_of(tmp_path), host="127.0.0.1", port=deployment.dicom_port)) == {0}

    def running_job() -> dict | None:  # type: ignore[type-arg]
        jobs = deployment.study(uid).get("jobs", [])
        return next((j for j in jobs if j["state"] == "running"), None)

    job = wait_until(running_job, 120, "a worker to start scoring", interval=0.2, logs=deployment.logs)
    pid = int(re.match(r"cttriage-cpu-(\d+)@", job["worker"]).group(1))  # type: ignore[union-attr]
    [victim] = [p for p in deployment.processes.values() if p.proc and p.proc.pid == pid]
    victim.kill(signal.SIGKILL)
    killed_at = time.monotonic()

    study = one_result(deployment, uid)
    recovery_s = time.monotonic() - killed_at
    assert recovery_s < 90, f"scored {recovery_s:.0f} s after the kill"
    print(f"worker kill recovered in {recovery_s:.1f} s")
    [final_job] = [j for j in study["jobs"] if j["id"] == job["id"]]
    assert final_job["state"] == "done" and final_job["attempts"] == 2, final_job  # killed one + one run
    claims = job_log_lines(deployment, job["id"], "job claimed")
    assert sorted(c["attempt"] for c in claims) == [1, 2], claims
    assert len(job_log_lines(deployment, job["id"], "study scored")) == 1
    assert final_job["worker"] != job["worker"]  # the survivor scored it
    assert abs(study["severity_left"] - truth["severity_left"]) <= 3.0
    engine = create_engine(deployment.env["CTTRIAGE_DATABASE_URL"])
    with engine.connect() as conn:
        study_id = conn.execute(select(Study.id).where(Study.study_uid == uid)).scalar_one()
        assert conn.execute(select(func.count()).select_from(Result).where(Result.study_id == study_id)).scalar() == 1
    engine.dispose()
    # a new worker takes the killed one's place for the next tests
    deployment.start("worker-replacement", "worker", "--device", "cpu")


def test_redis_down_while_studies_arrive(deployment: Deployment, tmp_path: Path) -> None:
    truths = [write_phantom_study(tmp_path / str(i), severity_left=5.0 + 20 * i, severity_right=3.0, seed=50 + i,
                                  **SMALL) for i in range(2)]
    redis_down()
    try:
        ready = API.get(f"{deployment.api}/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["checks"]["broker"] != "ok", ready.text
        for i in range(2):
            assert set(push_files(files_of(tmp_path / str(i)), host="127.0.0.1", port=deployment.dicom_port)) == {0}
        # settled and queued in the database (the outbox), waiting for the broker
        for truth in truths:
            study = wait_for_state(deployment.api, truth["study_instance_uid"], states=("queued",), timeout=60,
                                   logs=deployment.logs)
            assert study["jobs"][-1]["state"] == "pending"
        time.sleep(2)
    finally:
        redis_up()
    for truth in truths:
        study = one_result(deployment, truth["study_instance_uid"])
        assert abs(study["severity_left"] - truth["severity_left"]) <= 3.0


def test_postgres_restart_under_load_loses_nothing_acknowledged(deployment: Deployment, tmp_path: Path) -> None:
    truths = [write_phantom_study(tmp_path / str(i), severity_left=10.0, severity_right=15.0 + 10 * i, seed=60 + i,
                                  **SMALL) for i in range(3)]

    def restart() -> None:
        time.sleep(0.5)
        postgres_ctl("restart", "-m", "fast")

    acknowledged = push_at_once([tmp_path / str(i) for i in range(3)], deployment.dicom_port, restart)
    assert len(acknowledged) == sum(t["files"] for t in truths)
    engine = create_engine(deployment.env["CTTRIAGE_DATABASE_URL"], pool_pre_ping=True)
    with engine.connect() as conn:
        recorded = set(conn.execute(select(Instance.sop_instance_uid)).scalars())
    engine.dispose()
    assert set(acknowledged) <= recorded  # every success answer is in the database
    for truth in truths:
        study = wait_for_state(deployment.api, truth["study_instance_uid"], logs=deployment.logs, timeout=300)
        assert study["state"] == "scored", study
        assert study["instance_count"] == truth["files"]
