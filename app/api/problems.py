"""HTTP problem responses (RFC 9457): the one place typed errors become HTTP answers."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from app.errors import CtTriageError

PROBLEM_JSON = "application/problem+json"


def problem(status: int, title: str, detail: str | None = None, **extra: object) -> JSONResponse:
    body: dict[str, object] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(CtTriageError)
    async def _typed_error(_request: Request, exc: CtTriageError) -> JSONResponse:
        response = problem(exc.http_status, exc.title, str(exc) or None)
        if exc.http_status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response
