"""Fast recovery (issue 12, items 3 and 10), on SQLite and PostgreSQL: the claim is the lock
(a second delivery stops while the holder beats, takes over once it is silent), a running job
whose worker stopped beating and an enqueued job no worker claimed go back to the outbox long
before the processing timeout, and settling does not count a listener or database outage as
silence."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from app.assembly import assembler_pass, settle_clock_start
from app.broker import Broker
from app.db.models import Job, JobState, Listener, StudyState, utcnow
from app.lifecycle import beat_job, claim_job, queue_settled_studies, requeue_stale_jobs
from app.liveness import ListenerHeartbeat, beat
from app.outbox import dispatch_pending_jobs
from app.settings import Settings
from tests.test_assembly import add, factory, received, study  # noqa: F401 - factory is a fixture
from worker.jobs import JobHeartbeat

PROCESSING_TIMEOUT = 1800.0
HEARTBEAT_TIMEOUT = 45.0


def job_row(factory: sessionmaker[Session], job_id: int) -> Job:  # noqa: F811
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def settled_job(factory: sessionmaker[Session], uid: str) -> int:  # noqa: F811
    add(factory, received(uid, f"{uid}.1"))
    [job_id] = queue_settled_studies(factory, settle_seconds=0, now=utcnow() + timedelta(seconds=1))
    return job_id


def test_a_second_claim_stops_while_the_holder_beats_and_takes_over_when_it_is_silent(
        factory: sessionmaker[Session]) -> None:  # noqa: F811
    job_id = settled_job(factory, "1.8.1")
    first = claim_job(factory, job_id, "w1", max_attempts=5, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT)
    assert first is not None and first.attempts == 1
    # Celery's restored task, or the assembler's re-send, while w1 is alive: stops, changes nothing.
    assert claim_job(factory, job_id, "w2", max_attempts=5, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT,
                     now=utcnow() + timedelta(seconds=30)) is None
    job = job_row(factory, job_id)
    assert (job.state, job.worker, job.attempts) == (JobState.running.value, "w1", 1)
    assert beat_job(factory, first)  # w1 renews its claim
    # w1 died: its heartbeat is older than the timeout, the next delivery takes over.
    second = claim_job(factory, job_id, "w2", max_attempts=5, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT,
                       now=utcnow() + timedelta(seconds=HEARTBEAT_TIMEOUT + 1))
    assert second is not None and second.attempts == 2
    assert job_row(factory, job_id).worker == "w2"
    assert not beat_job(factory, first), "w1 (if it was only paused) learns it lost the claim"
    assert beat_job(factory, second)
    # A claim let go (a transient error before the task's retry) is taken over at once.
    assert beat_job(factory, second, alive=False)
    third = claim_job(factory, job_id, "w2", max_attempts=5, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT)
    assert third is not None and third.attempts == 3


def test_a_running_job_whose_worker_stopped_beating_goes_back_within_the_heartbeat_timeout(
        factory: sessionmaker[Session]) -> None:  # noqa: F811
    job_id = settled_job(factory, "1.8.2")
    dispatch_pending_jobs(factory, lambda j, p: "t")
    job = claim_job(factory, job_id, "w1", max_attempts=5, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT)
    assert job is not None

    def requeue(after: float) -> int:
        return requeue_stale_jobs(factory, PROCESSING_TIMEOUT, now=utcnow() + timedelta(seconds=after),
                                  heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT, resend_seconds=60)

    assert requeue(30) == 0
    assert requeue(HEARTBEAT_TIMEOUT + 1) == 1, "not the processing timeout (30 min)"
    assert job_row(factory, job_id).state == JobState.pending.value


def test_the_job_heartbeat_thread_keeps_a_long_job_alive(factory: sessionmaker[Session]) -> None:  # noqa: F811
    job_id = settled_job(factory, "1.8.3")
    job = claim_job(factory, job_id, "w1", max_attempts=5, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT)
    assert job is not None
    started = job_row(factory, job_id).heartbeat_at
    with JobHeartbeat(factory, job, interval=0.05, max_seconds=PROCESSING_TIMEOUT):
        time.sleep(0.4)
    beaten = job_row(factory, job_id).heartbeat_at
    assert started is not None and beaten is not None and beaten > started


def test_an_unclaimed_enqueued_job_is_sent_again_with_backoff(factory: sessionmaker[Session]) -> None:  # noqa: F811
    job_id = settled_job(factory, "1.8.4")
    sent: list[int] = []

    def enqueue(job_id: int, _priority: int) -> str:
        sent.append(job_id)
        return f"t{len(sent)}"

    def relay() -> None:
        assert dispatch_pending_jobs(factory, enqueue) == 1

    def requeue(after: float) -> int:
        return requeue_stale_jobs(factory, PROCESSING_TIMEOUT, now=utcnow() + timedelta(seconds=after),
                                  heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT, resend_seconds=60)

    relay()
    assert requeue(30) == 0
    assert requeue(61) == 1  # the broker lost it (Redis restarted without AOF): sent again
    relay()
    assert job_row(factory, job_id).sends == 2
    assert requeue(61) == 0, "the second wait is twice as long (a long queue is not flooded)"
    assert requeue(121) == 1
    relay()
    # Claimed meanwhile: no longer enqueued, never sent again.
    assert claim_job(factory, job_id, "w1", max_attempts=5, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT)
    assert requeue(HEARTBEAT_TIMEOUT - 5) == 0
    assert sent == [job_id] * 3


def test_settling_restarts_its_clock_when_the_listener_comes_back(factory: sessionmaker[Session]) -> None:  # noqa: F811
    settle, listener_timeout = 30.0, 20.0
    t0 = utcnow()
    try:
        beat(factory, "host:CTTRIAGE:11112", restarted=True, now=t0)
        add(factory, received("1.8.5", "1.8.5.1"))

        def settle_at(after: float) -> list[int]:
            now = t0 + timedelta(seconds=after)
            paused, since = settle_clock_start(factory, listener_timeout, now=now)
            return [] if paused else queue_settled_studies(factory, settle, now=now, receiving_since=since)

        # The listener dies right after the first instance; it is down longer than settle_seconds.
        assert settle_clock_start(factory, listener_timeout, now=t0 + timedelta(seconds=25)) == (True, None)
        assert settle_at(100) == [], "no settling while no listener can receive"
        back = t0 + timedelta(seconds=100)
        beat(factory, "host:CTTRIAGE:11112", restarted=True, now=back)
        assert settle_clock_start(factory, listener_timeout, now=back) == (False, back)
        for after in (101, 110, 129):
            beat(factory, "host:CTTRIAGE:11112", restarted=False, now=t0 + timedelta(seconds=after))
            assert settle_at(after) == [], f"settled {after - 100:.0f} s after the listener came back"
        assert len(settle_at(130 + 1)) == 1
    finally:
        with factory.begin() as session:
            session.execute(delete(Listener))


def test_settling_restarts_its_clock_after_the_assemblers_own_database_outage(
        factory: sessionmaker[Session]) -> None:  # noqa: F811
    settings = Settings(settle_seconds=30)
    add(factory, received("1.8.6", "1.8.6.1"), when_offset=-100)  # quiet for 100 s, through the outage
    broker = Broker(settings)
    broker.enqueue_scoring = lambda job_id, priority: "t"  # type: ignore[method-assign]
    assembler_pass(factory, broker, settings, resumed_at=utcnow() - timedelta(seconds=5))
    assert study(factory, "1.8.6").state == StudyState.receiving.value
    assembler_pass(factory, broker, settings, resumed_at=utcnow() - timedelta(seconds=31))
    assert study(factory, "1.8.6").state == StudyState.queued.value


def test_the_listener_heartbeat_thread_writes_its_row_and_removes_it_on_stop(
        factory: sessionmaker[Session]) -> None:  # noqa: F811
    heartbeat = ListenerHeartbeat(factory, "host:CTTRIAGE:1", interval=0.05, timeout=20)
    heartbeat.start()
    try:
        with factory() as session:  # written before start() returns
            assert session.execute(select(Listener.name)).scalars().all() == ["host:CTTRIAGE:1"]
        assert settle_clock_start(factory, 20)[0] is False
    finally:
        heartbeat.stop()
    with factory() as session:
        assert session.execute(select(Listener)).scalars().all() == []


def test_the_listener_heartbeat_restarts_the_clock_after_missed_beats(
        factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Beats failing for longer than two intervals (the database was down) move ``up_since`` to
    the first good one; a single failed beat does not."""
    import app.liveness as liveness

    failing = {"n": 0}
    real_beat = liveness.beat

    def flaky_beat(*args: object, **kwargs: object) -> None:
        if failing["n"] > 0:
            failing["n"] -= 1
            raise RuntimeError("database down")
        real_beat(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(liveness, "beat", flaky_beat)

    def up_since() -> object:
        with factory() as session:
            return session.execute(select(Listener.up_since)).scalar_one()

    heartbeat = ListenerHeartbeat(factory, "host:CTTRIAGE:2", interval=0.3, timeout=20)
    heartbeat.start()
    try:
        first = up_since()
        failing["n"] = 1
        time.sleep(1.0)
        assert up_since() == first, "one failed beat is not an outage"
        failing["n"] = 5
        time.sleep(2.5)
        assert up_since() > first  # type: ignore[operator]
    finally:
        heartbeat.stop()
