"""HTTP problem responses (RFC 9457): the one place typed errors become HTTP answers."""

from __future__ import annotations

import logging
import traceback
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import CtTriageError

log = logging.getLogger(__name__)

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

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        """A bug: the type is logged (the message may quote data), the client gets a problem."""
        log.error("unexpected error answering a request",
                  extra={"error": type(exc).__name__, "stack": "".join(traceback.format_tb(exc.__traceback__))})
        return problem(500, _phrase(500))


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
