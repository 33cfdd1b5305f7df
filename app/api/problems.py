"""HTTP problem responses (RFC 9457): the one place typed errors become HTTP answers."""

from __future__ import annotations

import logging
import traceback
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import CtTriageError, imaging_mapping
from models.errors import ImagingError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
#: Seconds a client is told to wait when the database is away (a restart takes about this long).
RETRY_AFTER_SECONDS = 10


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
        if exc.transient:
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response

    @app.exception_handler(ImagingError)
    async def _imaging_error(_request: Request, exc: ImagingError) -> JSONResponse:
        mapping = imaging_mapping(exc)
        return problem(mapping.http_status, mapping.title, str(exc) or None)

    async def _database_away(_request: Request, exc: Exception) -> JSONResponse:
        """Database down, unreachable or every connection busy: 503, try again shortly."""
        log.warning("database unavailable answering a request", extra={"error": type(exc).__name__})
        response = problem(503, "Database unavailable", "the database cannot be reached; retry later")
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response

    for away in (OperationalError, InterfaceError, PoolTimeoutError):
        app.add_exception_handler(away, _database_away)

    @app.exception_handler(DataError)
    async def _unstorable(_request: Request, exc: DataError) -> JSONResponse:
        """A value the database refuses (out of range, a NUL): the request, not the server, is wrong."""
        log.warning("database refused a value of a request", extra={"error": type(exc).__name__})
        return problem(422, "Request is not valid", "a value of the request cannot be used")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Unknown routes (404), wrong methods (405) and the like answer in the same shape."""
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail != _phrase(exc.status_code) else None
        response = problem(exc.status_code, _phrase(exc.status_code), detail)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """Where and why, never the value sent: a query or body may carry patient data."""
        errors = [{"loc": [str(part) for part in error.get("loc", ())], "msg": str(error.get("msg", ""))}
                  for error in exc.errors()]
        detail = "; ".join(f"{'.'.join(error['loc'])}: {error['msg']}" for error in errors)
        return problem(422, "Request is not valid", detail or None, errors=errors)


class CatchUnexpected:
    """A bug answers a 500 problem and is logged once, here: its type and stack, never its text
    (which may quote data). FastAPI's handler for ``Exception`` would re-raise it to the server,
    whose log would print it whole, SQL parameters and all; this middleware swallows it instead."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.error("unexpected error answering a request",
                      extra={"error": type(exc).__name__, "stack": "".join(traceback.format_tb(exc.__traceback__))})
            if not started:
                await problem(500, _phrase(500))(scope, receive, send)


class RefuseNul:
    """A NUL in the path or query string is refused (400) before any route sees it: no database
    stores it, and it is never part of a UID, a filter or a name."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = (scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")) + b"?" + scope.get(
                "query_string", b"")
            if b"\x00" in raw or b"%00" in raw.lower() or "\x00" in scope["path"]:
                await problem(400, "Request is not valid", "the path or query holds a NUL character")(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
