"""The benchmark's view of the database: per study its timestamps, state and jobs, why a batch is
stuck, and whether PostgreSQL or Redis restarted during a batch (then it measured nothing clean)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, text

TERMINAL = ("scored", "failed", "rejected")


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
    except Exception as exc:
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


