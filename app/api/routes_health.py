"""Liveness, readiness and Prometheus metrics (no patient data; open to the scraper)."""

from __future__ import annotations

import shutil

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from app.api.deps import SessionDep, SessionFactoryDep, SettingsDep
from app.api.problems import problem
from app.metrics import DatabaseCollector

router = APIRouter(tags=["health"])


def _database_ok(session: SessionDep) -> str | None:
    try:
        session.execute(text("SELECT 1"))
    except DBAPIError as exc:
        return type(exc).__name__
    return None


@router.get("/healthz")
def healthz(session: SessionDep, settings: SettingsDep) -> JSONResponse:
    """Liveness: 200 when the database answers and the storage root exists."""
    if error := _database_ok(session):
        return problem(503, "Database unavailable", error)
    if not settings.storage_root.is_dir():
        return problem(503, "Storage unavailable", "storage root does not exist")
    return JSONResponse({"status": "ok", "database": "ok", "storage": "ok"})


@router.get("/readyz")
def readyz(request: Request, session: SessionDep, settings: SettingsDep) -> JSONResponse:
    """Readiness: database, broker and storage (exists, writable, above the free-space floor)."""
    checks: dict[str, str] = {"database": _database_ok(session) or "ok"}
    broker = request.app.state.broker
    try:
        if broker is not None:
            broker.ping()
        checks["broker"] = "ok"
    except Exception as exc:  # any failure to reach the broker
        checks["broker"] = type(exc).__name__
    root = settings.storage_root
    if not root.is_dir():
        checks["storage"] = "missing"
    else:
        free = shutil.disk_usage(root).free
        checks["storage"] = "ok" if free >= settings.min_free_bytes else f"only {free // 2**20} MiB free"
    if any(v != "ok" for v in checks.values()):
        return problem(503, "Not ready", ", ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok"),
                       checks=checks)
    return JSONResponse({"status": "ready", **checks})


@router.get("/metrics", include_in_schema=False)
def metrics(factory: SessionFactoryDep) -> Response:
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(factory))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
