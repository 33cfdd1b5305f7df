"""Study assembly on both databases: settle, queue once, outbox relay, reopen on new instances."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, event, select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Export, ExportState, Instance, Job, JobState, Result, Series, Study, StudyState, utcnow
from app.db.session import make_engine
from app.ingest import ReceivedInstance, record_instance
from app.lifecycle import claim_job, queue_settled_studies, release_running_jobs, request_rescore, requeue_stale_jobs
from app.outbox import dispatch_overdue_exports, dispatch_pending_jobs
from app.settings import Settings
from models.findings import LUNG_MASK_IMPLAUSIBLE, PARTIAL_COVERAGE, ScoreFlag
from tests.conftest import scored
from worker.jobs import run_job, write_result


def received(study: str, sop: str, series: str = "1.2.3.1") -> ReceivedInstance:
    return ReceivedInstance(
        study_uid=study, series_uid=f"{study}.{series}", sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CT", series_number=2, series_description="axial",
        accession_number="A1", study_date="20260101", study_description="CT chest", patient_age="054Y",
        patient_sex="F", headers=[],
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        from app.db.migrate import upgrade_to_head

        url = f"sqlite:///{tmp_path / 'a.sqlite'}"
        upgrade_to_head(url)
    else:
        url = request.getfixturevalue("pg_url")
    engine = make_engine(url)
    maker = sessionmaker(engine, expire_on_commit=False)

    def empty() -> None:  # the PostgreSQL database is shared by the run: start and end with none
        with maker.begin() as session:
            for model in (Export, Result, Job, Instance, Series, Study):
                session.execute(delete(model))

    empty()
    yield maker
    empty()
    engine.dispose()


def add(factory: sessionmaker[Session], item: ReceivedInstance, when_offset: float = 0.0) -> bool:
    with factory.begin() as session:
        return record_instance(session, item, path=Path("/nonexistent"), size_bytes=10, source="dicom",
                               calling_aet="X", now=utcnow() + timedelta(seconds=when_offset))


def job_row(session: Session, job_id: int) -> Job:
    """The job's row (Session.get is Optional: a missing row fails the test)."""
    job = session.get(Job, job_id)
    assert job is not None
    return job


def study(factory: sessionmaker[Session], uid: str) -> Study:
    with factory() as session:
        return session.execute(select(Study).where(Study.study_uid == uid)).scalar_one()


def test_resend_is_idempotent(factory: sessionmaker[Session]) -> None:
    assert add(factory, received("1.9.1", "1.9.1.1")) is False
    assert add(factory, received("1.9.1", "1.9.1.1")) is True
    with factory() as session:
        inst = session.execute(select(Instance)).scalar_one()
    assert inst.receive_count == 2
    assert study(factory, "1.9.1").instance_count == 1


def test_settles_once_after_quiet_period(factory: sessionmaker[Session]) -> None:
    add(factory, received("1.9.2", "1.9.2.1"))
    add(factory, received("1.9.2", "1.9.2.2"))
    assert queue_settled_studies(factory, settle_seconds=30) == []  # still receiving
    later = utcnow() + timedelta(seconds=31)
    jobs = queue_settled_studies(factory, settle_seconds=30, now=later)
    assert len(jobs) == 1
    assert queue_settled_studies(factory, settle_seconds=30, now=later) == []  # queued once
    assert study(factory, "1.9.2").state == StudyState.queued.value


def test_outbox_keeps_jobs_when_broker_is_down(factory: sessionmaker[Session]) -> None:
    add(factory, received("1.9.3", "1.9.3.1"))
    [job_id] = queue_settled_studies(factory, settle_seconds=0, now=utcnow() + timedelta(seconds=1))

    def broker_down(_job_id: int, _priority: int) -> str:
        raise ConnectionError("redis down")

    assert dispatch_pending_jobs(factory, broker_down) == 0
    with factory() as session:
        assert job_row(session, job_id).state == JobState.pending.value
    sent: list[int] = []

    def enqueue(job_id: int, _priority: int) -> str:
        sent.append(job_id)
        return f"task-{job_id}"

    assert dispatch_pending_jobs(factory, enqueue) == 1
    assert sent == [job_id]
    with factory() as session:
        job = job_row(session, job_id)
        assert job.state == JobState.enqueued.value and job.celery_task_id == f"task-{job_id}"


def test_new_instance_after_queueing_reopens_as_new_version(factory: sessionmaker[Session]) -> None:
    add(factory, received("1.9.4", "1.9.4.1"))
    queue_settled_studies(factory, settle_seconds=0, now=utcnow() + timedelta(seconds=1))
    with factory.begin() as session:
        session.execute(Study.__table__.update().values(state=StudyState.scored.value))
    add(factory, received("1.9.4", "1.9.4.2"))  # a late instance
    s = study(factory, "1.9.4")
    assert (s.state, s.version) == (StudyState.receiving.value, 2)
    add(factory, received("1.9.4", "1.9.4.2"))  # its re-send does not bump again
    assert study(factory, "1.9.4").version == 2
    [job2] = queue_settled_studies(factory, settle_seconds=0, now=utcnow() + timedelta(seconds=1))
    with factory() as session:
        assert job_row(session, job2).study_version == 2
        assert session.execute(select(Study)).scalars().all().__len__() == 1  # never a duplicate row


def test_an_instance_filed_under_another_study_moves_there(factory: sessionmaker[Session]) -> None:
    """A PACS merge or split re-sends instances under another study, keeping their UIDs: the row
    moves (before, it stayed, an empty study appeared and the instance never counted there), and
    both studies are reopened to be scored on what they now hold."""
    add(factory, received("1.9.11", "1.9.11.1"))
    add(factory, received("1.9.11", "1.9.11.2"))
    with factory.begin() as session:
        session.execute(Study.__table__.update().values(state=StudyState.scored.value))
    moved = received("1.9.12", "1.9.11.2")
    assert add(factory, moved) is False  # not a plain re-send
    old, new = study(factory, "1.9.11"), study(factory, "1.9.12")
    assert (old.state, old.version, old.instance_count) == (StudyState.receiving.value, 2, 1)
    assert (new.state, new.version, new.instance_count) == (StudyState.receiving.value, 1, 1)
    with factory() as session:
        row = session.execute(select(Instance).where(Instance.sop_instance_uid == "1.9.11.2")).scalar_one()
        new_series = session.execute(select(Series).where(Series.study_id == new.id)).scalar_one()
        old_series = session.execute(select(Series).where(Series.study_id == old.id)).scalar_one()
        assert (row.study_id, row.series_id, row.receive_count) == (new.id, new_series.id, 2)
        assert (old_series.instance_count, new_series.instance_count) == (1, 1)
    # Sent there again, re-encoded: a plain re-send, whose row describes the new bytes.
    again = received("1.9.12", "1.9.11.2")
    again = ReceivedInstance(**{**again.__dict__, "transfer_syntax_uid": "1.2.840.10008.1.2"})
    assert add(factory, again) is True
    assert study(factory, "1.9.12").instance_count == 1
    with factory() as session:
        row = session.execute(select(Instance).where(Instance.sop_instance_uid == "1.9.11.2")).scalar_one()
        assert (row.transfer_syntax_uid, row.receive_count) == ("1.2.840.10008.1.2", 3)


def test_rescore_supersedes_pending_job(factory: sessionmaker[Session]) -> None:
    add(factory, received("1.9.5", "1.9.5.1"))
    [job1] = queue_settled_studies(factory, settle_seconds=0, now=utcnow() + timedelta(seconds=1))
    job2 = request_rescore(factory, "1.9.5")
    assert job2 is not None and job2 != job1
    with factory() as session:
        assert job_row(session, job1).state == JobState.superseded.value
        assert job_row(session, job2).study_version == 2
    assert request_rescore(factory, "9.9.9") is None


def test_a_late_instance_while_a_worker_claims_the_job_is_never_lost(factory: sessionmaker[Session]) -> None:
    """The listener reopens the study (version 2, receiving) just as a worker claims the version-1
    job: the job is superseded and the study stays receiving, so it settles and is scored again."""
    add(factory, received("1.9.9", "1.9.9.1"))
    [job_id] = queue_settled_studies(factory, settle_seconds=0, now=utcnow() + timedelta(seconds=1))
    engine = factory.kw["bind"]
    late = {"sent": False}

    def late_instance_first(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        # Just before the claim's first write: the late instance commits on another connection.
        if not late["sent"] and statement.lstrip().upper().startswith("UPDATE"):
            late["sent"] = True
            add(factory, received("1.9.9", "1.9.9.2"))

    event.listen(engine, "before_cursor_execute", late_instance_first)
    try:
        assert claim_job(factory, job_id, worker="w", max_attempts=5) is None
    finally:
        event.remove(engine, "before_cursor_execute", late_instance_first)
    assert late["sent"]
    s = study(factory, "1.9.9")
    assert (s.state, s.version, s.instance_count) == (StudyState.receiving.value, 2, 2)
    with factory() as session:
        assert job_row(session, job_id).state == JobState.superseded.value
    [job2] = queue_settled_studies(factory, settle_seconds=0, now=utcnow() + timedelta(seconds=1))
    claimed = claim_job(factory, job2, worker="w", max_attempts=5)
    assert claimed is not None and claimed.study_version == 2
    assert study(factory, "1.9.9").state == StudyState.processing.value


def test_a_job_that_never_finishes_fails_its_study_after_its_attempts(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """Out of memory or a lost worker, again and again: the study fails with the reason after
    job_max_attempts instead of holding a worker up every processing timeout, forever."""
    settings = Settings(data_dir=tmp_path / "data", job_max_attempts=3)
    add(factory, received("1.9.10", "1.9.10.1"))
    [job_id] = queue_settled_studies(factory, settle_seconds=0, now=utcnow() + timedelta(seconds=1))

    def out_of_memory() -> None:
        raise MemoryError

    # A worker that runs out of memory hands the job back at once, with the reason.
    for attempt in (1, 2):
        outcome = run_job(job_id, factory, settings, worker="w", networks=out_of_memory)
        assert (outcome.status, outcome.reason) == ("retry", "out of memory while scoring")
        with factory() as session:
            job = job_row(session, job_id)
            assert (job.state, job.attempts, job.error) == (JobState.pending.value, attempt, outcome.reason)
        assert study(factory, "1.9.10").state == StudyState.processing.value
    # A worker that vanishes: the sweeper puts the job back after the processing timeout.
    assert claim_job(factory, job_id, worker="w", max_attempts=3) is not None
    assert requeue_stale_jobs(factory, timeout_seconds=60, now=utcnow() + timedelta(seconds=61)) == 1

    assert run_job(job_id, factory, settings, worker="w", networks=out_of_memory).status == "skipped"
    s = study(factory, "1.9.10")
    assert (s.state, s.reason_code) == (StudyState.failed.value, "AttemptsExhausted")
    assert s.reason is not None and "gave up after 3 attempts" in s.reason and "no worker finished it" in s.reason
    with factory() as session:
        job = job_row(session, job_id)
        assert (job.state, job.attempts) == (JobState.failed.value, 3)
    assert run_job(job_id, factory, settings, worker="w").status == "skipped"  # and stays failed
    # A rescore is a new job with its own attempts.
    job2 = request_rescore(factory, "1.9.10")
    assert job2 is not None and claim_job(factory, job2, worker="w", max_attempts=3) is not None


def test_stale_jobs_go_back_to_the_outbox(factory: sessionmaker[Session]) -> None:
    add(factory, received("1.9.6", "1.9.6.1"))
    [job_id] = queue_settled_studies(factory, settle_seconds=0, now=utcnow() + timedelta(seconds=1))
    dispatch_pending_jobs(factory, lambda j, p: "t")
    assert requeue_stale_jobs(factory, timeout_seconds=60) == 0
    assert requeue_stale_jobs(factory, timeout_seconds=60, now=utcnow() + timedelta(seconds=61)) == 1
    with factory() as session:
        assert job_row(session, job_id).state == JobState.pending.value


def test_the_embedded_service_starts_by_releasing_jobs_its_last_stop_cut_off(factory: sessionmaker[Session]) -> None:
    add(factory, received("1.9.13", "1.9.13.1"))
    [job_id] = queue_settled_studies(factory, settle_seconds=0, now=utcnow() + timedelta(seconds=1))
    assert claim_job(factory, job_id, worker="w", max_attempts=5) is not None  # then the service stopped
    assert release_running_jobs(factory) == 1
    with factory() as session:
        job = job_row(session, job_id)
        assert (job.state, job.error) == (JobState.pending.value, "re-queued: the service stopped while it ran")
    assert release_running_jobs(factory) == 0


def test_dispatch_uses_the_queue_priority_policy(factory: sessionmaker[Session]) -> None:
    for uid, band in (("1.9.7", 4), ("1.9.8", 1)):
        add(factory, received(uid, f"{uid}.1"))
        with factory.begin() as session:  # as if scored before, with this band
            session.execute(Study.__table__.update().where(Study.study_uid == uid)
                            .values(state=StudyState.scored.value, severity_band=band))
        add(factory, received(uid, f"{uid}.2"))  # a re-scan
    add(factory, received("1.9.9", "1.9.9.1"))  # first time
    queue_settled_studies(factory, settle_seconds=0, now=utcnow() + timedelta(seconds=1))
    request_rescore(factory, "1.9.8")
    sent: dict[int, int] = {}

    def enqueue(job_id: int, priority: int) -> str:
        sent[job_id] = priority
        return "t"

    dispatch_pending_jobs(factory, enqueue)
    with factory() as session:
        by_study = {(uid, trigger): sent[job_id] for job_id, uid, trigger in session.execute(
            select(Job.id, Study.study_uid, Job.trigger).join(Study).where(Job.id.in_(list(sent))))}
    assert by_study == {("1.9.7", "settled"): 0, ("1.9.9", "settled"): 3, ("1.9.8", "rescore"): 6}


def pending_exports(factory: sessionmaker[Session], uid: str, due_offsets_s: list[float | None]) -> int:
    """A scored study whose result has one pending export per offset (next attempt due that many
    seconds from now; None: never set, as rows from before migration 0006). Returns the result id."""
    now = utcnow()
    with factory.begin() as session:
        row = Study(study_uid=uid, state=StudyState.scored.value, first_received_at=now, last_received_at=now)
        session.add(row)
        session.flush()
        job = Job(study_id=row.id, study_version=1, state=JobState.done.value, trigger="settled")
        session.add(job)
        session.flush()
        result = Result(study_id=row.id, job_id=job.id, study_version=1, series_uid=f"{uid}.1", method="threshold",
                        model_version="t", severity=1.0, severity_left=1.0, severity_right=0.5,
                        lung_volume_left_ml=1.0, lung_volume_right_ml=1.0, lesion_volume_left_ml=0.0,
                        lesion_volume_right_ml=0.0)
        session.add(result)
        session.flush()
        for i, offset in enumerate(due_offsets_s):
            session.add(Export(study_id=row.id, result_id=result.id, kind=("sr", "seg", "sc")[i],
                               sop_instance_uid=f"{uid}.9.{i}", state=ExportState.pending.value, attempts=0,
                               next_attempt_at=None if offset is None else now + timedelta(seconds=offset)))
        return result.id


def test_overdue_exports_go_back_to_the_broker(factory: sessionmaker[Session]) -> None:
    """Exports whose task the broker never got or lost are handed over again, once per result, only
    when late by the grace period, and kept for the next pass while the broker is down."""
    overdue = pending_exports(factory, "7.1", [-7200.0, -7200.0])
    legacy = pending_exports(factory, "7.2", [None])
    waiting = pending_exports(factory, "7.3", [-60.0, 600.0])  # a retry the broker still holds

    def broker_down(_result_id: int) -> str:
        raise ConnectionError("broker down")

    assert dispatch_overdue_exports(factory, broker_down, grace_seconds=1800) == 0
    handed: list[int] = []
    assert dispatch_overdue_exports(factory, handed.append, grace_seconds=1800) == 2
    assert handed == [overdue, legacy]
    assert dispatch_overdue_exports(factory, handed.append, grace_seconds=1800) == 0  # due again only later
    assert waiting not in handed
    later = utcnow() + timedelta(seconds=3600)
    assert dispatch_overdue_exports(factory, handed.append, grace_seconds=1800, now=later) == 3
    assert sorted(handed[2:]) == sorted([overdue, legacy, waiting])


def test_a_lower_bound_scoring_floors_the_band_and_puts_its_flags_on_the_study(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """A 10 % severity that is only a lower bound goes on the worklist at CT-3 with its flags; the
    next scoring's scores replace them (here: none)."""
    settings = Settings(data_dir=tmp_path / "data")
    add(factory, received("1.9.20", "1.9.20.1"))
    [job_id] = queue_settled_studies(factory, settle_seconds=0, now=utcnow() + timedelta(seconds=1))
    job = claim_job(factory, job_id, worker="w", max_attempts=5)
    assert job is not None
    flags = (ScoreFlag(LUNG_MASK_IMPLAUSIBLE, "the left lung mask is small", lower_bound=True),
             ScoreFlag(PARTIAL_COVERAGE, "cut at the apex"))
    write_result(factory, job, scored(10.0, 4.0, flags), settings)
    s = study(factory, "1.9.20")
    assert (s.state, s.severity, s.severity_band, s.severity_lower_bound) == ("scored", 10.0, 3, True)
    assert 3000 <= (s.priority or 0) < 4000
    assert s.flags == [f.to_dict() for f in flags]

    job2 = claim_job(factory, request_rescore(factory, "1.9.20") or 0, worker="w", max_attempts=5)
    assert job2 is not None
    write_result(factory, job2, scored(10.0, 4.0), settings)
    s = study(factory, "1.9.20")
    assert (s.severity_band, s.severity_lower_bound, s.flags) == (1, False, [])
    assert (s.priority or 0) < 2000


def scored_study(factory: sessionmaker[Session], uid: str, instances: int) -> None:
    for i in range(instances):
        add(factory, received(uid, f"{uid}.{i}"))
    with factory.begin() as session:
        session.execute(Study.__table__.update().where(Study.study_uid == uid).values(state=StudyState.scored.value))


def test_a_duplicate_only_resend_does_not_reopen(factory: sessionmaker[Session]) -> None:
    """A PACS forwarding the same study again: every instance a re-send, the version stays."""
    scored_study(factory, "1.9.20", 3)
    last_received = study(factory, "1.9.20").last_received_at
    for i in range(3):
        assert add(factory, received("1.9.20", f"1.9.20.{i}"), when_offset=5) is True
    s = study(factory, "1.9.20")
    assert (s.state, s.version, s.instance_count) == (StudyState.scored.value, 1, 3)
    assert s.last_received_at == last_received, "nothing new arrived: 'last received' stays before 'scored'"
    assert queue_settled_studies(factory, settle_seconds=0, now=utcnow() + timedelta(seconds=10)) == []


def test_instances_that_cannot_change_the_scoring_do_not_reopen(factory: sessionmaker[Session]) -> None:
    """Our own SR sent back, or any series that is not CT, is stored and counted, never scored:
    the study keeps its version and state, and the series says why."""
    scored_study(factory, "1.9.21", 2)
    ours = ReceivedInstance(**{**received("1.9.21", "1.9.21.sr", series="9901").__dict__, "modality": "SR",
                               "sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.34", "created_by": "SR"})
    dose = ReceivedInstance(**{**received("1.9.21", "1.9.21.pdf", series="999").__dict__, "modality": "DOC"})
    assert add(factory, ours) is False and add(factory, dose) is False
    s = study(factory, "1.9.21")
    assert (s.state, s.version, s.instance_count) == (StudyState.scored.value, 1, 4)
    with factory() as session:
        reasons = {row.series_uid: row.skip_reason for row in session.execute(select(Series)).scalars()}
    assert reasons == {"1.9.21.1.2.3.1": None, "1.9.21.9901": "created by cttriage (SR)",
                       "1.9.21.999": "modality DOC is not CT"}
    add(factory, received("1.9.21", "1.9.21.9"))  # a new CT slice still reopens
    s = study(factory, "1.9.21")
    assert (s.state, s.version) == (StudyState.receiving.value, 2)
