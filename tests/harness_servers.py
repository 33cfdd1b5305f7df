"""The local PostgreSQL and Redis for tests and benchmarks: a database of one's own per run, a flushed
Redis database, and stopping or restarting the servers for fault runs."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from tests.conftest import PG_ADMIN_URL
from tests.service_process import wait_until

REDIS_HOST_URL = "redis://127.0.0.1:6379"


def pg_url(name: str) -> str:
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def create_database(prefix: str, migrate: bool = True, admin_url: str = PG_ADMIN_URL) -> str:
    """A new database ``<prefix>_<hex>``, migrated to head unless ``migrate`` is false; its URL."""
    from app.db.migrate import upgrade_to_head

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    # No pooled connection may outlive a PostgreSQL restart (the fault runs restart it).
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    url = pg_url(name)
    if migrate:
        upgrade_to_head(url)
    return url


def drop_database(url: str, admin_url: str = PG_ADMIN_URL) -> None:
    """Drop the database of ``url``, ending its sessions first (a killed process may have left some)."""
    name = url.rsplit("/", 1)[1]
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                         {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    finally:
        admin.dispose()


@contextmanager
def scratch_database(prefix: str, migrate: bool = True, admin_url: str = PG_ADMIN_URL) -> Iterator[str]:
    """A database of this run's own (see :func:`create_database`), dropped afterwards."""
    url = create_database(prefix, migrate, admin_url)
    try:
        yield url
    finally:
        drop_database(url, admin_url)


def truncate_all(url: str) -> None:
    """Empty every table but Alembic's, so that each run on one database starts from the same state."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            tables = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                                       "AND tablename <> 'alembic_version'")).scalars().all()
            if tables:
                conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()


@contextmanager
def flushed_redis(db: int) -> Iterator[str]:
    """Redis database ``db``, flushed before and after; its URL."""
    url = f"{REDIS_HOST_URL}/{db}"
    redis.Redis.from_url(url).flushdb()
    try:
        yield url
    finally:
        redis.Redis.from_url(url).flushdb()


def redis_down() -> None:
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", "6379", "shutdown", "nosave"], capture_output=True)
    wait_until(lambda: subprocess.run(["redis-cli", "-h", "127.0.0.1", "ping"], capture_output=True).returncode != 0,
               20, "Redis to stop")


def redis_up() -> None:
    subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379", "--save", "",
                    "--appendonly", "no"], check=True, capture_output=True)
    wait_until(lambda: redis.Redis(host="127.0.0.1").ping(), 20, "Redis to start")


def postgres_ctl(action: str, *options: str) -> None:
    """``pg_ctlcluster`` on this machine's one cluster: ``postgres_ctl("restart", "-m", "fast")``."""
    cluster = os.listdir("/etc/postgresql")[0]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", action, *options],
                   check=True, capture_output=True, timeout=120)


def ensure_servers() -> None:
    """Start Redis and PostgreSQL if a fault run left either stopped."""
    try:
        redis.Redis(host="127.0.0.1", socket_timeout=2).ping()
    except redis.RedisError:
        redis_up()
    if subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432"], capture_output=True).returncode != 0:
        postgres_ctl("start")
