"""Time to triage (issue 13): a study whose association delivered a complete series settles a few
seconds after the release; anything else waits the full settle time.

The rule itself against a database (:func:`app.assembly.mark_released`, then
:func:`app.lifecycle.queue_settled_studies`), then through the real interface: ``cttriage serve``
with two listener processes, studies sent over DICOM associations, the job's trigger and timing
read back from the API.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.assembly import mark_released, seconds_to_next_pass
from app.db.models import Instance, Job, JobTrigger, Study, StudyState, utcnow
from app.dicom.push import push_files
from app.lifecycle import queue_settled_studies
from app.series_selection import SeriesCriteria
from app.settings import Settings
from tests.conftest import store_study_files, write_phantom_study
from tests.service_process import API, embedded_service, listener_children, listener_pid, wait_for_state

#: 40 slices 7 mm apart: 280 mm of chest, a complete series by the default rules (150 mm).
SMALL = {"slices": 40, "rows": 128, "columns": 128, "pixel_spacing": 2.8, "slice_spacing": 7.0}


def _series_uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)


def _study(factory: sessionmaker[Session], uid: str) -> Study:
    with factory() as session:
        study = session.execute(select(Study).where(Study.study_uid == uid)).scalar_one()
        session.expunge(study)
        return study


def _jobs(factory: sessionmaker[Session], uid: str) -> list[Job]:
    with factory() as session:
        return list(session.execute(select(Job).join(Study).where(Study.study_uid == uid)).scalars())


def test_a_complete_series_settles_after_the_quiet_period(sqlite_settings: Settings,
                                                          sqlite_factory: sessionmaker[Session],
                                                          tmp_path: Path) -> None:
    truth = write_phantom_study(tmp_path / "s", **SMALL)
    store_study_files(sqlite_settings, sqlite_factory, tmp_path / "s")
    uid, now = truth["study_instance_uid"], utcnow()
    marked = mark_released(sqlite_factory, {uid: {_series_uid(tmp_path / "s")}}, SeriesCriteria(), 3.0, now=now)
    assert marked == [uid]
    assert _study(sqlite_factory, uid).settle_due_at == now + timedelta(seconds=3)
    # The assembler wakes when the mark is due, not up to a pass later.
    assert 2.0 < seconds_to_next_pass(sqlite_factory, 5.0) <= 3.0
    assert seconds_to_next_pass(sqlite_factory, 1.0) == 1.0
    # Not before the quiet period is over, though settle_seconds (1 s here) would not wait that long
    # from 'now': the release rule alone is judged by giving a long settle time.
    assert queue_settled_studies(sqlite_factory, 3600.0, now=now + timedelta(seconds=2.9)) == []
    assert len(queue_settled_studies(sqlite_factory, 3600.0, now=now + timedelta(seconds=3.1))) == 1
    study = _study(sqlite_factory, uid)
    assert study.state == StudyState.queued.value and study.settle_due_at is None
    assert seconds_to_next_pass(sqlite_factory, 1.0) == 1.0
    assert [j.trigger for j in _jobs(sqlite_factory, uid)] == [JobTrigger.released.value]


@pytest.mark.parametrize("cut", ["missing slice", "slab"])
def test_an_incomplete_series_waits_the_full_settle_time(cut: str, sqlite_settings: Settings,
                                                         sqlite_factory: sessionmaker[Session],
                                                         tmp_path: Path) -> None:
    truth = write_phantom_study(tmp_path / "s", **SMALL)
    files = sorted((tmp_path / "s").glob("*.dcm"))
    # A gap in the middle (the stack is no longer uniform), or the top half only (140 mm of chest).
    dropped = [files[len(files) // 2]] if cut == "missing slice" else files[20:]
    for path in dropped:
        path.unlink()
    store_study_files(sqlite_settings, sqlite_factory, tmp_path / "s")
    uid, now = truth["study_instance_uid"], utcnow()
    assert mark_released(sqlite_factory, {uid: {_series_uid(tmp_path / "s")}}, SeriesCriteria(), 3.0, now=now) == []
    assert queue_settled_studies(sqlite_factory, 30.0, now=now + timedelta(seconds=10)) == []
    assert len(queue_settled_studies(sqlite_factory, 30.0, now=now + timedelta(seconds=31))) == 1
    assert [j.trigger for j in _jobs(sqlite_factory, uid)] == [JobTrigger.settled.value]


def test_an_instance_after_the_release_clears_the_mark(sqlite_settings: Settings,
                                                       sqlite_factory: sessionmaker[Session], tmp_path: Path) -> None:
    truth = write_phantom_study(tmp_path / "s", **SMALL)
    last = sorted((tmp_path / "s").glob("*.dcm"))[-1]
    held_back = tmp_path / last.name
    last.rename(held_back)  # 39 of 40 slices: still 273 mm, complete by the rules
    store_study_files(sqlite_settings, sqlite_factory, tmp_path / "s")
    uid = truth["study_instance_uid"]
    before = utcnow()
    assert mark_released(sqlite_factory, {uid: {_series_uid(tmp_path / "s")}}, SeriesCriteria(), 3.0,
                         now=before) == [uid]
    held_back.rename(last)
    store_study_files(sqlite_settings, sqlite_factory, tmp_path / "s")  # another association, still open
    assert _study(sqlite_factory, uid).settle_due_at is None
    assert queue_settled_studies(sqlite_factory, 3600.0, now=utcnow() + timedelta(seconds=5)) == []


def test_a_release_that_saw_older_data_does_not_mark(sqlite_settings: Settings,
                                                     sqlite_factory: sessionmaker[Session], tmp_path: Path) -> None:
    """The mark's 'now' is taken before the headers are read: an instance recorded after it means
    more is arriving, and the study keeps waiting."""
    truth = write_phantom_study(tmp_path / "s", **SMALL)
    store_study_files(sqlite_settings, sqlite_factory, tmp_path / "s")
    uid = truth["study_instance_uid"]
    stale = utcnow() - timedelta(seconds=60)
    assert mark_released(sqlite_factory, {uid: {_series_uid(tmp_path / "s")}}, SeriesCriteria(), 3.0,
                         now=stale) == []


# --- through the real interface -----------------------------------------------------------------

SETTLE_SECONDS = 12.0
AFTER_RELEASE_SECONDS = 1.0
#: The assembler passes once a second; the broker and the worker's claim take well under a second.
ASSEMBLER_SLACK_SECONDS = 2.5


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _settle_gap(study: dict) -> float:  # type: ignore[type-arg]
    """Seconds from the study's last instance to its (only) job's creation."""
    (job,) = study["jobs"]
    return (_when(job["created_at"]) - _when(study["last_received_at"])).total_seconds()


@pytest.mark.slow
def test_a_worker_on_the_embedded_broker_looks_for_tasks_every_poll_interval(tmp_path: Path) -> None:
    """A released study's job waits for an idle worker at most one poll of the embedded (SQLite)
    broker: the worker's consumer sets its connection's poll to ``embedded_broker_poll_seconds``
    (kombu's default is 1 s). A Redis worker has no such step: the broker wakes it."""
    from worker.celery_app import create_celery

    app = create_celery(Settings(data_dir=tmp_path, embedded_broker_poll_seconds=0.2))
    [step] = [s for s in app.steps["consumer"] if s.__name__ == "PollBroker"]
    with app.connection_for_read() as connection:
        assert connection.transport.polling_interval == 1.0  # kombu's own
        step(SimpleNamespace()).start(SimpleNamespace(connection=connection))
        assert connection.transport.polling_interval == 0.2
    redis = create_celery(Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0"))
    assert not [s for s in redis.steps["consumer"] if s.__name__ == "PollBroker"]


def test_a_worker_imports_its_job_code_as_it_starts(tmp_path: Path) -> None:
    """The first study after a worker (re)starts does not wait for the job code's imports (numpy,
    scipy, torch: seconds): they happen at ``worker_process_init``, before any task arrives."""
    script = ("import sys; from app.settings import Settings; from worker.celery_app import WorkerResources; "
              "assert 'worker.jobs' not in sys.modules; "
              f"WorkerResources(Settings(data_dir={str(tmp_path)!r})).warm_up(); "
              "print('worker.jobs' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def test_settle_rules_through_dicom_associations(tmp_path: Path) -> None:
    """One ``cttriage serve`` with two listener processes: a complete series in one association is
    queued within the quiet period of its release; a series split over two associations with a gap
    shorter than the settle time is scored once, when complete; one with a missing slice waits the
    full settle time."""
    complete = write_phantom_study(tmp_path / "complete", seed=1, **SMALL)
    split = write_phantom_study(tmp_path / "split", seed=2, **SMALL)
    gap = write_phantom_study(tmp_path / "gap", seed=3, **SMALL)
    with embedded_service(tmp_path, CTTRIAGE_SETTLE_SECONDS=str(SETTLE_SECONDS),
                          CTTRIAGE_SETTLE_AFTER_RELEASE_SECONDS=str(AFTER_RELEASE_SECONDS),
                          CTTRIAGE_DICOM_PROCESSES="2") as service:
        assert service.process.proc is not None
        children = listener_children(service.process.proc.pid)
        assert len(children) == 2, "cttriage serve runs two listener processes"

        def send(files: list[Path]) -> None:
            assert set(push_files(files, host="127.0.0.1", port=service.dicom_port)) == {0}

        gap_files = sorted((tmp_path / "gap").glob("*.dcm"))
        send(gap_files[:20] + gap_files[21:])
        send(sorted((tmp_path / "complete").glob("*.dcm")))
        study = wait_for_state(service.api, complete["study_instance_uid"], timeout=60, logs=service.process.log)
        assert study["state"] == "scored", study
        assert study["jobs"][0]["trigger"] == "released"
        assert _settle_gap(study) <= AFTER_RELEASE_SECONDS + ASSEMBLER_SLACK_SECONDS
        # The series with a missing slice, released before it, still waits.
        assert API.get(f"{service.api}/api/studies/{gap['study_instance_uid']}").json()["state"] == "receiving"

        split_files = sorted((tmp_path / "split").glob("*.dcm"))
        send(split_files[:20])  # the top 140 mm: not a chest yet
        time.sleep(AFTER_RELEASE_SECONDS + ASSEMBLER_SLACK_SECONDS)
        first_half = API.get(f"{service.api}/api/studies/{split['study_instance_uid']}").json()
        assert first_half["state"] == "receiving", first_half
        send(split_files[20:])
        study = wait_for_state(service.api, split["study_instance_uid"], timeout=60, logs=service.process.log)
        assert study["state"] == "scored" and study["instance_count"] == 40, study
        assert [j["trigger"] for j in study["jobs"]] == ["released"]

        # The missing slice: nothing but the settle time settles it (and series selection then
        # rejects the stack for its gap).
        study = wait_for_state(service.api, gap["study_instance_uid"], timeout=90, logs=service.process.log)
        assert study["state"] == "rejected" and "spacing" in study["reason"], study
        assert study["jobs"][0]["trigger"] == "settled"
        assert study["jobs"][0]["trigger_description"].startswith("no instance arrived")
        assert _settle_gap(study) >= SETTLE_SECONDS - 0.5

        # Scored once each, and nothing more comes: the split study is not rescored later.
        time.sleep(AFTER_RELEASE_SECONDS + ASSEMBLER_SLACK_SECONDS)
        for truth, scorings in ((complete, 1), (split, 1), (gap, 0)):
            body = API.get(f"{service.api}/api/studies/{truth['study_instance_uid']}").json()
            assert len(body["results"]) == scorings and len(body["jobs"]) == 1, body

        # Both listener processes are the ones that received (a process id in every record).
        from sqlalchemy import create_engine

        engine = create_engine(f"sqlite:///{service.data_dir / 'cttriage.sqlite'}")
        with engine.connect() as conn:
            # received_by is None only for rows older than the column; these came through a listener
            receivers = cast("set[str]", set(conn.execute(select(Instance.received_by)).scalars()))
        engine.dispose()
        pids = {listener_pid(name) for name in receivers}
        assert pids <= children and os.getpid() not in pids, (pids, children)
