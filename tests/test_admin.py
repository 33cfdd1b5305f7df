"""Admin API, the pages' helpers and the live worklist signature, in process on both databases.

A fixed history of studies, jobs and results with known times is written straight to the
database, so every number of the overview (counts, queue, workers, throughput, latency
percentiles, storage) is checked exactly; the embedded service with real studies is
tests/test_browser.py.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from app.admin import percentile
from app.api.main import create_app
from app.broker import Broker
from app.db.migrate import upgrade_to_head
from app.db.models import (
    ApiKey,
    AuditEvent,
    Instance,
    Job,
    JobState,
    QuarantinedFile,
    Result,
    Series,
    Study,
    StudyState,
    utcnow,
)
from app.db.session import make_engine
from app.live import WorklistWatcher, worklist_signature
from app.security import Role, create_api_key
from app.settings import Settings
from models.findings import LUNG_MASK_IMPLAUSIBLE, ScoreFlag
from models.phantom import PhantomSpec
from models.phantom_dicom import write_phantom
from models.predictor import THRESHOLD_MODEL_VERSION
from tests.conftest import scored
from worker.jobs import write_result

TABLES = (AuditEvent, QuarantinedFile, Result, Job, Instance, Series, Study)


@dataclass
class Setup:
    client: TestClient
    factory: sessionmaker[Session]
    settings: Settings
    admin: dict[str, str]
    reader: dict[str, str]
    enqueued: list[tuple[int, int]]
    now: datetime


@pytest.fixture(scope="module")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Migrated once; each test gets a copy."""
    path = tmp_path_factory.mktemp("template") / "admin.sqlite"
    upgrade_to_head(f"sqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    if request.param == "sqlite":
        shutil.copy(request.getfixturevalue("migrated_sqlite"), tmp_path / "admin.sqlite")
        url = f"sqlite:///{tmp_path / 'admin.sqlite'}"
    else:
        url = request.getfixturevalue("pg_url")
    settings = Settings(data_dir=tmp_path, database_url=url, min_free_bytes=0)
    settings.storage_root.mkdir(parents=True)
    engine = make_engine(url)
    factory = sessionmaker(engine, expire_on_commit=False)
    suffix = tmp_path.name[-12:]
    with factory.begin() as session:  # the PostgreSQL database is shared by the run
        for model in TABLES:
            session.execute(delete(model))
        admin_key = create_api_key(session, f"boss-{suffix}", Role.admin)
        reader_key = create_api_key(session, f"reader-{suffix}", Role.radiologist)
    enqueued: list[tuple[int, int]] = []

    def enqueue(job_id: int, priority: int) -> str:
        enqueued.append((job_id, priority))
        return f"task-{job_id}"

    broker = Broker(settings)
    broker.enqueue_scoring = enqueue  # type: ignore[method-assign]

    now = utcnow()
    seed(factory, settings.storage_root, now)
    client = TestClient(create_app(settings, factory, broker))
    yield Setup(client, factory, settings, {"Authorization": f"Bearer {admin_key}"},
                {"X-API-Key": reader_key}, enqueued, now)
    with factory.begin() as session:
        for model in TABLES:
            session.execute(delete(model))
        session.execute(delete(ApiKey).where(ApiKey.name.in_([f"boss-{suffix}", f"reader-{suffix}"])))
    engine.dispose()


def seed(factory: sessionmaker[Session], storage_root: Path, now: datetime) -> None:
    """Nine studies covering every state; times relative to ``now`` (seconds unless noted)."""
    s = timedelta(seconds=1)
    with factory.begin() as session:
        def study(uid: str, state: StudyState, received_ago: timedelta, **values: Any) -> Study:
            row = Study(study_uid=uid, accession_number=f"ACC{uid}", state=state.value,
                        first_received_at=now - received_ago - 5 * s, last_received_at=now - received_ago, **values)
            session.add(row)
            session.flush()
            return row

        def job(row: Study, version: int, state: JobState, trigger: str = "settled", worker: str | None = "w1",
                enqueued_ago: timedelta | None = None, started_ago: timedelta | None = None,
                finished_ago: timedelta | None = None, error: str | None = None) -> Job:
            item = Job(study_id=row.id, study_version=version, state=state.value, trigger=trigger, worker=worker,
                       error=error, created_at=now - (enqueued_ago or 0 * s) - s, attempts=1,
                       enqueued_at=now - enqueued_ago if enqueued_ago is not None else None,
                       started_at=now - started_ago if started_ago is not None else None,
                       finished_at=now - finished_ago if finished_ago is not None else None)
            session.add(item)
            session.flush()
            return item

        def result(row: Study, item: Job, severity: float, created_ago: timedelta) -> None:
            session.add(Result(study_id=row.id, job_id=item.id, study_version=item.study_version, series_uid="9.9",
                               method="threshold", model_version=THRESHOLD_MODEL_VERSION, identification=None,
                               severity=severity, severity_left=severity, severity_right=severity / 2,
                               lung_volume_left_ml=1000, lung_volume_right_ml=1100, lesion_volume_left_ml=10,
                               lesion_volume_right_ml=5, timings={"total": 1.0}, details={},
                               created_at=now - created_ago))

        # scored: latency (last instance -> scored) 10 s and 20 s this hour, 100 s five hours ago
        a = study("1.1", StudyState.scored, 40 * s, severity=60.0, severity_band=3, priority=3050.6, version=2)
        result(a, job(a, 1, JobState.done, enqueued_ago=35 * s, started_ago=33 * s, finished_ago=30 * s), 55.0, 30 * s)
        # an admin's rescore of A: no arrival latency
        result(a, job(a, 2, JobState.done, "rescore", enqueued_ago=14 * s, started_ago=12 * s, finished_ago=10 * s),
               60.0, 10 * s)
        b = study("1.2", StudyState.scored, 70 * s, severity=10.0, severity_band=1, priority=1050.1)
        result(b, job(b, 1, JobState.done, enqueued_ago=56 * s, started_ago=54 * s, finished_ago=50 * s), 10.0, 50 * s)
        c = study("1.3", StudyState.scored, timedelta(hours=5, seconds=100), severity=30.0, severity_band=2,
                  priority=2050.3, files_purged_at=now)
        result(c, job(c, 1, JobState.done, worker="w2", enqueued_ago=timedelta(hours=5, seconds=10),
                      started_ago=timedelta(hours=5, seconds=5), finished_ago=timedelta(hours=5)),
               30.0, timedelta(hours=5))
        # rejected this hour, failed two hours ago (another worker)
        d = study("1.4", StudyState.rejected, timedelta(minutes=21), reason="no usable series: series 2 (1 slice)",
                  reason_code="NoUsableSeriesError")
        job(d, 1, JobState.done, finished_ago=timedelta(minutes=20), started_ago=timedelta(minutes=20),
            error="no usable series: series 2 (1 slice)")
        e = study("1.5", StudyState.failed, timedelta(hours=2), reason="scoring failed: ValueError: x",
                  reason_code="ValueError")
        job(e, 1, JobState.failed, worker="w2", finished_ago=timedelta(hours=2), error="scoring failed: ValueError: x")
        # waiting: one pending (outbox), one with the broker, one running, one still arriving
        job(study("1.6", StudyState.queued, 9 * s), 1, JobState.pending, worker=None)
        job(study("1.7", StudyState.queued, 8 * s), 1, JobState.enqueued, worker=None, enqueued_ago=7 * s)
        job(study("1.8", StudyState.processing, 6 * s), 1, JobState.running, enqueued_ago=5 * s, started_ago=4 * s)
        hostile = study("1.9", StudyState.receiving, 1 * s)
        hostile.accession_number = '=HYPERLINK("http://x")'

        # storage: A's two instances count, C's files were purged, one quarantined file
        for row, size in ((a, 100), (a, 100), (c, 1000)):
            series = session.query(Series).filter_by(study_id=row.id).first()
            if series is None:
                series = Series(study_id=row.id, series_uid=f"{row.study_uid}.1", instance_count=0)
                session.add(series)
                session.flush()
            n = session.query(Instance).filter_by(study_id=row.id).count()
            session.add(Instance(study_id=row.id, series_id=series.id, sop_instance_uid=f"{row.study_uid}.1.{n}",
                                 sop_class_uid="1.2", transfer_syntax_uid="1.2", path="/x", size_bytes=size,
                                 source="dicom", headers=[]))
        session.add(QuarantinedFile(path="/q", size_bytes=7, reason="not DICOM", source="upload"))
    derived = storage_root / "_derived" / "1.1" / "job1"
    derived.mkdir(parents=True)
    (derived / "axial.png").write_bytes(b"x" * 123)


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([4.0], 95) == 4.0
    assert percentile([10.0, 20.0], 50) == 15.0
    assert percentile([10.0, 20.0, 100.0], 95) == pytest.approx(92.0)


def test_overview_numbers(setup: Setup) -> None:
    body = setup.client.get("/api/admin/overview", headers=setup.admin).json()
    assert body["studies_by_state"] == {"receiving": 1, "queued": 2, "processing": 1, "scored": 3, "failed": 1,
                                        "rejected": 1}
    assert body["queue"] == {"depth": 2, "pending": 1, "enqueued": 1, "running": 1}
    hour, day = body["throughput"]["hour"], body["throughput"]["day"]
    assert (hour["scored"], hour["rejected"], hour["failed"]) == (3, 1, 0)
    assert (day["scored"], day["rejected"], day["failed"]) == (4, 1, 1)
    assert hour["scored_per_hour"] == pytest.approx(3.0) and day["scored_per_hour"] == pytest.approx(4 / 24)
    # the rescore is no arrival: latencies 10 and 20 s this hour, and 100 s within the day
    assert hour["latency_seconds"] == {"count": 2, "p50": pytest.approx(15.0), "p95": pytest.approx(19.5)}
    assert day["latency_seconds"] == {"count": 3, "p50": pytest.approx(20.0), "p95": pytest.approx(92.0)}
    assert hour["queue_wait_seconds"]["p50"] == pytest.approx(2.0)  # 2, 2, 2 s
    assert hour["processing_seconds"]["p50"] == pytest.approx(3.0)  # 3, 2, 4 s
    [worker] = body["workers"]  # w2 finished nothing in the last hour
    assert worker["name"] == "w1" and worker["jobs_finished"] == 4 and worker["running"] == 1
    assert datetime.fromisoformat(worker["last_finished_at"]) == pytest.approx(setup.now - timedelta(seconds=10),
                                                                             abs=timedelta(seconds=1))
    storage = body["storage"]
    assert (storage["instances_bytes"], storage["quarantine_bytes"], storage["derived_bytes"]) == (200, 7, 123)
    assert storage["total_bytes"] == 330 and storage["disk_free_bytes"] > 0
    assert body["celery"]["checked"] is False


def test_failures_list_the_reason_and_the_last_error(setup: Setup) -> None:
    body = setup.client.get("/api/admin/failures", headers=setup.admin).json()
    assert body["total"] == 2
    rejected, failed = body["items"]  # most recently received first
    assert (rejected["study_uid"], rejected["state"], rejected["reason_code"]) == ("1.4", "rejected",
                                                                                   "NoUsableSeriesError")
    assert rejected["last_job"]["error"] == rejected["reason"]
    assert (failed["study_uid"], failed["last_job"]["state"], failed["last_job"]["worker"]) == ("1.5", "failed", "w2")
    assert setup.client.get("/api/admin/failures?limit=1&offset=1", headers=setup.admin).json()["items"][0][
        "study_uid"] == "1.5"


def test_retry_rescores_and_is_audited(setup: Setup) -> None:
    response = setup.client.post("/api/admin/studies/1.4/retry", headers=setup.admin)
    assert response.status_code == 202
    job_id = response.json()["job_id"]
    assert response.json()["enqueued"] is True and job_id in [j for j, _ in setup.enqueued]
    audit = setup.client.get("/api/admin/audit", params={"study_uid": "1.4"}, headers=setup.admin).json()
    assert [(a["action"], a["detail"]) for a in audit["items"]] == [("rescore", f"job {job_id}")]
    assert setup.client.post("/api/admin/studies/404/retry", headers=setup.admin).status_code == 404
    failures = setup.client.get("/api/admin/failures", headers=setup.admin).json()
    assert [f["study_uid"] for f in failures["items"]] == ["1.5"]  # 1.4 is queued again


def test_export_has_every_scoring_and_every_unscored_study(setup: Setup) -> None:
    response = setup.client.get("/api/admin/export.csv", headers=setup.admin)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["study_uid"] for r in rows] == ["1.1", "1.1", "1.2", "1.3", "1.4", "1.5", "1.6", "1.7", "1.8", "1.9"]
    first, rescore = rows[0], rows[1]
    assert (first["trigger"], first["latest"], first["severity"], first["severity_band"]) == ("settled", "False",
                                                                                              "55.0", "3")
    assert (rescore["trigger"], rescore["latest"], rescore["study_version"]) == ("rescore", "True", "2")
    assert rescore["method"] == "threshold" and rescore["model_version"] == THRESHOLD_MODEL_VERSION
    assert rows[4]["state"] == "rejected" and rows[4]["result_id"] == "" and rows[4]["reason_code"]
    assert rows[-1]["accession_number"] == '\'=HYPERLINK("http://x")'  # no formula in a spreadsheet

    records = json.loads(setup.client.get("/api/admin/export.json", headers=setup.admin).content)
    assert [r["study_uid"] for r in records] == [r["study_uid"] for r in rows]
    assert records[1]["latest"] is True and records[1]["identification"] is None and records[1]["severity"] == 60.0
    assert records[-1]["accession_number"] == '=HYPERLINK("http://x")'  # JSON keeps the value as it is

    only_scored = setup.client.get("/api/admin/export.json", params={"state": "scored", "band": [2, 3]},
                                   headers=setup.admin).json()
    assert [r["study_uid"] for r in only_scored] == ["1.1", "1.1", "1.3"]
    audit = setup.client.get("/api/admin/audit", params={"action": "export"}, headers=setup.admin).json()
    assert audit["total"] == 3 and audit["items"][0]["detail"] == "scores as json"


def test_roles(setup: Setup) -> None:
    client = setup.client
    for method, path in (("GET", "/api/admin/overview"), ("GET", "/api/admin/failures"), ("GET", "/api/admin/audit"),
                         ("GET", "/api/admin/export.csv"), ("GET", "/api/admin/export.json"),
                         ("POST", "/api/admin/studies/1.4/retry")):
        assert client.request(method, path).status_code == 401, path
        assert client.request(method, path, headers=setup.reader).status_code == 403, path
    assert client.get("/api/me", headers=setup.reader).json()["role"] == "radiologist"
    assert client.get("/api/me").status_code == 401
    assert client.get("/api/worklist/events").status_code == 401
    assert client.get("/api/admin/audit", headers=setup.admin).json()["total"] == 0  # refusals read nothing


def test_worklist_band_filter(setup: Setup) -> None:
    def uids(**params: Any) -> list[str]:
        return [i["study_uid"] for i in setup.client.get("/api/worklist", params=params, headers=setup.reader)
                .json()["items"]]

    assert uids(band=3) == ["1.1"]
    assert uids(band=[1, 2]) == ["1.3", "1.2"]
    assert uids(band=[1, 2], state="failed") == []
    assert setup.client.get("/api/worklist", params={"band": 5}, headers=setup.reader).status_code == 422


def test_pages_are_served_with_a_strict_policy(setup: Setup) -> None:
    client = setup.client
    for path, marker in (("/", "worklist"), ("/studies/1.2.3", "study"), ("/admin", "admin")):
        page = client.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert marker in page.text.lower()
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert "<script>" not in page.text  # no inline script: the policy would block it
    assert client.get("/static/common.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/app.css").headers["content-type"].startswith("text/css")
    for bad in ("/static/worklist.html", "/static/..%2Fmain.py", "/static/nope.js"):
        assert client.get(bad).status_code == 404, bad
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/admin/overview", "/api/admin/export.{fmt}", "/api/worklist/events", "/api/me"} <= set(paths)


@pytest.mark.redis
def test_celery_ping_through_redis(tmp_path: Path, redis_url: str) -> None:
    """With a broker that can broadcast, the overview says which workers answer (any other test's
    workers on the same Redis database may answer too), and that a broker is down."""
    from app.api.routes_admin import _celery_ping

    reachable = Settings(data_dir=tmp_path, broker_url=redis_url)
    ping = _celery_ping(Broker(reachable), reachable)
    assert ping.checked is True and isinstance(ping.responding, list) and ping.note is None
    unreachable = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0")
    down = _celery_ping(Broker(unreachable), unreachable)
    assert down.checked is False and "unreachable" in (down.note or "")


def test_signature_moves_with_every_worklist_change(setup: Setup) -> None:
    def signature() -> Any:
        with setup.factory() as session:
            return worklist_signature(session)

    seen = [signature()]
    with setup.factory.begin() as session:  # a worker picks up the enqueued job
        session.execute(update(Job).where(Job.state == JobState.enqueued.value).values(state=JobState.running.value))
    seen.append(signature())
    with setup.factory.begin() as session:  # it fails
        session.execute(update(Job).where(Job.state == JobState.running.value).values(state=JobState.failed.value))
    seen.append(signature())
    setup.client.post("/api/admin/studies/1.5/retry", headers=setup.admin)  # a new job
    seen.append(signature())
    assert len(set(seen)) == len(seen)
    assert signature() == seen[-1]  # and it stays put while nothing happens


def test_every_error_is_a_problem_without_the_values_sent(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unknown routes, wrong methods, invalid parameters and bugs answer application/problem+json
    like the typed errors, with a string detail the pages can show, never quoting what was sent."""
    def is_problem(response: Any, status: int) -> dict[str, Any]:
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert body["status"] == status and isinstance(body["title"], str)
        assert isinstance(body.get("detail", ""), str)
        return body

    assert is_problem(setup.client.get("/api/no-such-thing", headers=setup.admin), 404)["title"] == "Not Found"
    # and nothing the API says is kept by a browser or a proxy
    for path in ("/api/worklist", "/api/no-such-thing", "/api/admin/overview"):
        assert setup.client.get(path, headers=setup.admin).headers["cache-control"] == "no-store", path
    wrong_method = setup.client.delete("/api/worklist", headers=setup.admin)
    is_problem(wrong_method, 405)
    assert "GET" in wrong_method.headers["allow"]
    invalid = is_problem(setup.client.get("/api/worklist?limit=-7777777", headers=setup.admin), 422)
    assert "limit" in invalid["detail"] and "7777777" not in json.dumps(invalid)

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("Doe^Jane 1970-01-01")  # a bug whose message quotes patient data

    monkeypatch.setattr("app.api.routes_studies.worklist_query", broken)
    client = TestClient(setup.client.app, raise_server_exceptions=False)
    failed = is_problem(client.get("/api/worklist", headers=setup.admin), 500)
    assert "Doe" not in json.dumps(failed)


def test_a_zip_is_stored_member_by_member_and_an_oversized_one_is_refused_unread(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member whose declared unpacked size is over the limit is refused before it is unpacked
    (a small zip of zeros once took 740 MB of memory); the others are stored and audited."""
    write_phantom(tmp_path / "study", PhantomSpec(slices=4, rows=64, columns=64, pixel_spacing=6.0))
    instances = sorted((tmp_path / "study").glob("*.dcm"))
    limit = max(path.stat().st_size for path in instances) + 1000
    monkeypatch.setattr(setup.settings, "max_instance_bytes", limit)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in instances:
            zf.write(path, f"study/{path.name}")
        zf.writestr("zeros.bin", b"\0" * (limit + 1))
    def counts() -> tuple[int, int]:
        with setup.factory() as session:
            return (session.scalar(select(func.count()).select_from(QuarantinedFile)) or 0,
                    session.scalar(select(func.count()).select_from(AuditEvent)
                                   .where(AuditEvent.action == "upload")) or 0)

    quarantined, audited = counts()
    response = setup.client.post("/api/studies", headers=setup.admin,
                                 files=[("files", ("study.zip", archive.getvalue(), "application/zip"))])
    assert response.status_code == 207, response.text  # some stored, one not
    report = response.json()
    assert report["stored"] == len(instances) and report["rejected"] == 1
    [refused] = [f for f in report["files"] if not f["stored"]]
    assert refused["filename"] == "zeros.bin" and f"more than {limit}" in refused["error"]
    assert refused["status"] == "refused"
    assert counts() == (quarantined, audited + 1)  # never unpacked, so nothing to quarantine


def test_day_filters_are_the_readers_days(setup: Setup) -> None:
    """A reader in Moscow (UTC+3) asking for 10 March gets what arrived on 10 March in Moscow:
    before, the days were UTC days and three hours of each were missing or misplaced."""
    utc = UTC
    arrivals = {"9.3.1": datetime(2026, 3, 9, 22, 30, tzinfo=utc),   # 01:30 on 10 March in Moscow
                "9.3.2": datetime(2026, 3, 10, 21, 30, tzinfo=utc)}  # 00:30 on 11 March in Moscow
    with setup.factory.begin() as session:
        for uid, at in arrivals.items():
            session.add(Study(study_uid=uid, state=StudyState.receiving.value, first_received_at=at,
                              last_received_at=at))

    def day(**params: str) -> list[str]:
        response = setup.client.get("/api/worklist", headers=setup.admin,
                                    params={"received_from": "2026-03-10", "received_to": "2026-03-10", **params})
        assert response.status_code == 200, response.text
        return [item["study_uid"] for item in response.json()["items"]]

    assert day(tz="Europe/Moscow") == ["9.3.1"]
    assert day() == ["9.3.2"]  # UTC unless told
    unknown = setup.client.get("/api/worklist", headers=setup.admin, params={"tz": "Mars/Olympus"})
    assert unknown.status_code == 422 and unknown.headers["content-type"] == "application/problem+json"
    csv_rows = setup.client.get("/api/admin/export.csv", headers=setup.admin, params={
        "received_from": "2026-03-10", "received_to": "2026-03-10", "tz": "Europe/Moscow"}).text
    assert "9.3.1" in csv_rows and "9.3.2" not in csv_rows


def test_watcher_survives_an_exhausted_connection_pool(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool timeout (every connection busy under a C-STORE burst) is no DBAPIError; it ended the
    watch for good before, and open worklists silently stopped updating until a restart."""
    calls = {"n": 0}
    real = WorklistWatcher._read_signature

    def busy_once(self: WorklistWatcher) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise PoolTimeoutError("QueuePool limit reached")
        return real(self)

    monkeypatch.setattr(WorklistWatcher, "_read_signature", busy_once)

    async def scenario() -> None:
        watcher = WorklistWatcher(setup.factory, interval=0.05)
        changes = watcher.changes(heartbeat=2.0)
        first = await anext(changes)
        assert first is not None  # the first yield is the generation, never a heartbeat
        await asyncio.sleep(0.3)  # the failing poll has come and gone
        assert calls["n"] > 2 and watcher._task is not None
        await asyncio.to_thread(setup.client.post, "/api/admin/studies/1.4/retry", headers=setup.admin)
        woke = await asyncio.wait_for(anext(changes), 2)
        assert woke is not None and woke > first
        await changes.aclose()

    asyncio.run(scenario())


def test_watcher_wakes_listeners_on_change_only(setup: Setup) -> None:
    async def scenario() -> None:
        watcher = WorklistWatcher(setup.factory, interval=0.05)
        changes = watcher.changes(heartbeat=0.5)
        first = await anext(changes)  # connected: load the worklist now
        assert first is not None
        other = watcher.changes(heartbeat=0.5)
        assert await anext(other) == first and watcher.listeners == 2
        assert await asyncio.wait_for(anext(changes), 2) is None  # quiet: a heartbeat
        await asyncio.to_thread(setup.client.post, "/api/admin/studies/1.4/retry", headers=setup.admin)
        # A retry commits twice (the job, then the audit row); a poll may fall between them.
        woke = await asyncio.wait_for(anext(changes), 2)
        assert woke is not None and woke > first
        other_woke = await asyncio.wait_for(anext(other), 2)
        assert other_woke is not None and other_woke > first
        await changes.aclose()
        await other.aclose()
        assert watcher.listeners == 0
        await asyncio.sleep(0.2)
        assert watcher._task is None  # nobody listens: no more polling

    asyncio.run(scenario())


def test_flags_and_descriptors_in_the_worklist_the_study_and_the_export(setup: Setup) -> None:
    """A lower-bound scoring: the worklist row says so (flag codes and messages, floored band), the
    study carries its current flags and descriptors, each scoring in the history its own, and the
    export has a column for each."""
    flag = ScoreFlag(LUNG_MASK_IMPLAUSIBLE, "the left lung mask is small", lower_bound=True)
    with setup.factory.begin() as session:
        row = Study(study_uid="1.20", accession_number="ACC1.20", state=StudyState.processing.value)
        session.add(row)
        session.flush()
        jobs = [Job(study_id=row.id, study_version=v, state=JobState.running.value, trigger="settled")
                for v in (1, 2)]
        session.add_all(jobs)
    write_result(setup.factory, jobs[0], scored(20.0, 5.0), setup.settings)
    with setup.factory.begin() as session:
        session.execute(update(Study).where(Study.study_uid == "1.20").values(version=2))
    write_result(setup.factory, jobs[1], scored(10.0, 4.0, (flag,)), setup.settings)

    items = setup.client.get("/api/worklist", headers=setup.reader).json()["items"]
    [item] = [i for i in items if i["study_uid"] == "1.20"]
    assert item["flags"] == [{"code": LUNG_MASK_IMPLAUSIBLE, "message": flag.message, "lower_bound": True}]
    assert (item["severity_lower_bound"], item["severity_band"], item["severity"]) == (True, 3, 10.0)
    assert [i["study_uid"] for i in items].index("1.20") < [i["study_uid"] for i in items].index("1.3")  # CT-2
    assert all(i["flags"] == [] and i["severity_lower_bound"] is False for i in items if i["study_uid"] != "1.20")
    assert "1.20" in [i["study_uid"] for i in setup.client.get(
        "/api/worklist", params={"band": 3}, headers=setup.reader).json()["items"]]

    study = setup.client.get("/api/studies/1.20", headers=setup.reader).json()
    assert study["flags"] == item["flags"] and study["severity_lower_bound"] is True
    assert study["descriptors"] == {
        "right": {"lesion_volume_ml": 64.0, "peripheral_share": 0.8, "ground_glass_share": 0.75,
                  "consolidation_share": 0.25, "foci": 3},
        "left": {"lesion_volume_ml": 150.0, "peripheral_share": 0.6, "ground_glass_share": 0.5,
                 "consolidation_share": 0.5, "foci": 2},
        "bilateral": True}
    first, second = study["results"]
    assert (first["flags"], first["severity_lower_bound"]) == ([], False)
    assert first["descriptors"]["left"]["lesion_volume_ml"] == 300.0  # its own, not the current one
    assert (second["flags"], second["severity_lower_bound"]) == (item["flags"], True)
    older = setup.client.get("/api/studies/1.2", headers=setup.reader).json()  # scored before flags existed
    assert (older["flags"], older["descriptors"], older["results"][0]["flags"]) == ([], None, [])

    rows = [r for r in csv.DictReader(io.StringIO(setup.client.get("/api/admin/export.csv", headers=setup.admin).text))
            if r["study_uid"] == "1.20"]
    assert [(r["flags"], r["severity_lower_bound"], r["severity_band"]) for r in rows] == [
        ("", "False", "1"), (LUNG_MASK_IMPLAUSIBLE, "True", "3")]
    assert (rows[1]["bilateral"], rows[1]["foci_right"], rows[1]["peripheral_share_left"]) == ("True", "3", "0.6")
    records = [r for r in setup.client.get("/api/admin/export.json", headers=setup.admin).json()
               if r["study_uid"] == "1.20"]
    assert records[1]["flags"] == [LUNG_MASK_IMPLAUSIBLE] and records[1]["consolidation_share_right"] == 0.25
