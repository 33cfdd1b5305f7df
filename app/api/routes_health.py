"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from app.api.deps import SessionDep, SettingsDep
from app.api.problems import problem

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(session: SessionDep, settings: SettingsDep) -> JSONResponse:
    """200 when the database answers and the storage root is writable."""
    try:
        session.execute(text("SELECT 1"))
    except DBAPIError as exc:
        return problem(503, "Database unavailable", type(exc).__name__)
    if not settings.storage_root.is_dir():
        return problem(503, "Storage unavailable", "storage root does not exist")
    return JSONResponse({"status": "ok", "database": "ok", "storage": "ok"})
