"""Several listener processes on one DICOM port (issue 13), on the production path (`cttriage dicom
--processes 2`, PostgreSQL, Redis, a Celery worker process): both receive, and a kill -9 of one
loses no acknowledged instance while its supervisor starts it again.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import create_engine, func, select

from app.db.models import Instance, Listener
from tests.conftest import write_phantom_study
from tests.deployment import Deployment, start_deployment
from tests.harness_cpu import process_cpu_seconds
from tests.service_process import c_echo, listener_pid, wait_for_state, wait_until
from tests.service_process import listener_children as children_of
from tests.test_faults import SMALL, files_of, push_at_once, push_like_a_pacs

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

#: Associations opened at once for the "both receive" check: all going to one of two idle
#: processes has a chance of 2^-11.
CONCURRENT_ASSOCIATIONS = 12


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, pg_url: str, redis_url: str) -> Iterator[Deployment]:
    deployment = start_deployment(tmp_path_factory.mktemp("listeners"), pg_url, redis_url, workers=1,
                                  dicom_processes="2")
    yield deployment
    deployment.stop()


def listener_children(deployment: Deployment) -> set[int]:
    """The pids of the `cttriage dicom` process's listener children."""
    proc = deployment.processes["dicom"].proc
    assert proc is not None
    return children_of(proc.pid)


def serving_children(deployment: Deployment) -> set[int]:
    """The listener children's pids once each serves: a child writes its heartbeat row once its
    server runs, after its imports. A child still starting takes no association and spends CPU."""
    engine = create_engine(deployment.env["CTTRIAGE_DATABASE_URL"])

    def serving() -> set[int] | None:
        children = listener_children(deployment)
        with engine.connect() as conn:
            names = conn.execute(select(Listener.name)).scalars().all()
        beating = {listener_pid(name) for name in names}
        return children if len(children) == 2 and children <= beating else None

    try:
        return wait_until(serving, 60, "both listener processes to serve")  # type: ignore[no-any-return]
    finally:
        engine.dispose()


def receivers(deployment: Deployment, sop_uids: set[str]) -> dict[str, int]:
    """SOP Instance UID -> the pid of the process that recorded it."""
    engine = create_engine(deployment.env["CTTRIAGE_DATABASE_URL"])
    with engine.connect() as conn:
        rows = conn.execute(select(Instance.sop_instance_uid, Instance.received_by)
                            .where(Instance.sop_instance_uid.in_(sop_uids))).all()
    engine.dispose()
    return {uid: listener_pid(str(by)) for uid, by in rows}


def test_both_listener_processes_receive(deployment: Deployment, tmp_path: Path) -> None:
    truth = write_phantom_study(tmp_path, seed=70, **SMALL)
    files = files_of(tmp_path)
    children = serving_children(deployment)
    established = threading.Barrier(CONCURRENT_ASSOCIATIONS, timeout=60)
    statuses: list[int] = []

    def one_association(path: Path) -> None:
        ae = AE(ae_title="PACS")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", deployment.dicom_port, ae_title="CTTRIAGE")
        assert assoc.is_established
        established.wait()  # every association is open before any sends: both processes were idle
        status = assoc.send_c_store(pydicom.dcmread(path))
        statuses.append(int(status.Status))
        assoc.release()

    threads = [threading.Thread(target=one_association, args=(p,)) for p in files[:CONCURRENT_ASSOCIATIONS]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [0] * CONCURRENT_ASSOCIATIONS
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files[:CONCURRENT_ASSOCIATIONS]}
    by = receivers(deployment, sent)
    assert set(by) == sent
    assert set(by.values()) == children, "each listener process received some of the associations"
    # The rest of the study over one association: it is scored as usual.
    push_like_a_pacs(files[CONCURRENT_ASSOCIATIONS:], deployment.dicom_port)
    study = wait_for_state(deployment.api, truth["study_instance_uid"], logs=deployment.logs, timeout=120)
    assert study["state"] == "scored" and study["instance_count"] == len(files), study


def test_a_listener_killed_mid_transfer_loses_nothing_acknowledged(deployment: Deployment, tmp_path: Path) -> None:
    truths = [write_phantom_study(tmp_path / str(i), seed=80 + i, severity_left=10.0 + 10 * i, **SMALL)
              for i in range(3)]
    children = serving_children(deployment)
    engine = create_engine(deployment.env["CTTRIAGE_DATABASE_URL"])

    def recorded() -> int:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(Instance)).scalar_one())

    before = recorded()
    victim = min(children)

    def kill_one_listener() -> None:
        wait_until(lambda: recorded() >= before + 15, 60, "instances to arrive", interval=0.05)
        os.kill(victim, signal.SIGKILL)

    acknowledged = push_at_once([tmp_path / str(i) for i in range(3)], deployment.dicom_port, kill_one_listener)
    assert len(acknowledged) == sum(t["files"] for t in truths)
    with engine.connect() as conn:
        rows = dict(conn.execute(select(Instance.sop_instance_uid, Instance.path)
                                 .where(Instance.sop_instance_uid.in_(set(acknowledged)))).all())
    engine.dispose()
    assert set(rows) == set(acknowledged), "every success answer is in the database"
    assert all(Path(path).is_file() for path in rows.values()), "and its file on disk"
    # The supervisor started a new listener in the killed one's place.
    def replaced() -> set[int] | None:
        now = listener_children(deployment)
        return now if len(now) == 2 and victim not in now else None

    wait_until(replaced, 30, "the killed listener to be replaced")
    for truth in truths:
        study = wait_for_state(deployment.api, truth["study_instance_uid"], logs=deployment.logs, timeout=300)
        assert study["state"] == "scored" and study["instance_count"] == truth["files"], study


def cpu_seconds(pid: int) -> float:
    seconds = process_cpu_seconds(pid)
    assert seconds is not None, f"process {pid} is gone"
    return seconds


def test_open_idle_associations_cost_the_listeners_nothing(deployment: Deployment) -> None:
    """A PACS may hold associations open between studies. pynetdicom's own association threads
    poll every millisecond (four idle associations: about 38 % of a core); the listener's wait for
    their socket or their DUL's events (app.dicom.event_driven), and still answer at once."""
    children = serving_children(deployment)  # a child still starting spends CPU on its imports
    ae = AE(ae_title="IDLE")
    ae.add_requested_context("1.2.840.10008.1.1")
    assocs = [ae.associate("127.0.0.1", deployment.dicom_port, ae_title="CTTRIAGE") for _ in range(4)]
    try:
        assert all(assoc.is_established for assoc in assocs)
        time.sleep(0.5)  # accepted and negotiated
        before = {pid: cpu_seconds(pid) for pid in children}
        time.sleep(3.0)
        spent = sum(cpu_seconds(pid) - before[pid] for pid in children)
        assert spent < 0.3, f"4 idle associations cost the listeners {spent:.2f} CPU s in 3 s"
        assert [int(assoc.send_c_echo().Status) for assoc in assocs] == [0] * 4
    finally:
        for assoc in assocs:
            assoc.release()
    assert all(assoc.is_released for assoc in assocs)


def test_a_listener_stopped_cleanly_leaves_the_others_serving(deployment: Deployment) -> None:
    """A child's clean stop closes its own descriptor of the shared socket, nothing more: the
    others keep accepting, and idle (no accept loop spinning on a socket shut down under it)."""
    children = listener_children(deployment)
    victim = min(children)
    os.kill(victim, signal.SIGTERM)

    def replaced() -> set[int] | None:
        now = listener_children(deployment)
        return now if len(now) == 2 and victim not in now else None

    wait_until(replaced, 30, "the stopped listener to be replaced")
    survivors = serving_children(deployment)
    before = {pid: cpu_seconds(pid) for pid in survivors}
    time.sleep(3.0)
    spent = {pid: cpu_seconds(pid) - before[pid] for pid in survivors}
    assert all(seconds < 0.5 for seconds in spent.values()), f"idle listeners busy: {spent}"
    assert [c_echo(deployment.dicom_port) for _ in range(4)] == [0] * 4
