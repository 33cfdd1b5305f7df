"""The browser pages (worklist, study detail, admin) and what only they need: their static
files, "who am I" for the signed-in key, and the live worklist stream.

The pages are plain HTML, CSS and JavaScript (no build step) and carry no data: each fetches the
API with the key the user signed in with (kept in sessionStorage, sent as ``Authorization:
Bearer``). A strict Content-Security-Policy allows only this origin's scripts and styles, so
text that came from DICOM headers can never run as code even if it were mis-rendered.

Live updates: ``GET /api/worklist/events`` is a Server-Sent Events stream (``event: worklist``
whenever the worklist changes, see :mod:`app.live`). The pages read it with ``fetch`` and a
streamed body rather than ``EventSource``, because EventSource cannot send the Authorization
header and an API key must not travel in a URL (URLs end up in proxy logs and browser history);
so the endpoint authenticates like every other one. A page falls back to polling when the
stream cannot be held open. Each stream ends after ``MAX_STREAM_SECONDS`` and the page
reconnects, so a revoked key stops receiving events within minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, StreamingResponse

from app.api.auth import Radiologist
from app.api.schemas_admin import Me
from app.errors import NotFoundError
from app.live import WorklistWatcher

STATIC_DIR = Path(__file__).parent / "static"
STATIC_NAME = re.compile(r"^[a-z][a-z0-9_-]*\.(js|css)$")
MEDIA_TYPES = {"js": "text/javascript", "css": "text/css", "html": "text/html"}

#: Pages and their files: scripts, styles and API calls from this origin only; pictures also
#: from blob: URLs (fetched with the key).
PAGE_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

HEARTBEAT_SECONDS = 15.0
MAX_STREAM_SECONDS = 300.0

router = APIRouter()


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC_DIR / name, media_type=MEDIA_TYPES[name.rsplit(".", 1)[1]], headers=PAGE_HEADERS)


@router.get("/", include_in_schema=False)
def worklist_page() -> FileResponse:
    return _page("worklist.html")


@router.get("/studies/{study_uid:path}", include_in_schema=False)
def study_page(study_uid: str) -> FileResponse:
    return _page("study.html")


@router.get("/admin", include_in_schema=False)
def admin_page() -> FileResponse:
    return _page("admin.html")


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str) -> FileResponse:
    if not STATIC_NAME.match(name) or not (STATIC_DIR / name).is_file():
        raise NotFoundError(f"no static file {name}")
    return _page(name)


@router.get("/api/me", response_model=Me, tags=["studies"])
def who_am_i(principal: Radiologist) -> Me:
    """The signed-in key's name and role (the pages show it and offer the admin page to admins)."""
    return Me(name=principal.name, role=principal.role.value)


def _watcher(request: Request) -> WorklistWatcher:
    state = request.app.state
    if not hasattr(state, "worklist_watcher"):
        state.worklist_watcher = WorklistWatcher(state.session_factory)
    return state.worklist_watcher  # type: ignore[no-any-return]


@router.get("/api/worklist/events", tags=["studies"], response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def worklist_events(request: Request, _principal: Radiologist) -> StreamingResponse:
    """Server-Sent Events: ``event: worklist`` once connected and whenever the worklist changes
    (reload it then), a comment every 15 s otherwise; the stream ends after 5 minutes (reconnect)."""
    watcher = _watcher(request)

    async def events() -> AsyncIterator[str]:
        yield "retry: 2000\n\n"
        loop_time = asyncio.get_running_loop().time
        deadline = loop_time() + MAX_STREAM_SECONDS
        async with contextlib.aclosing(watcher.changes(HEARTBEAT_SECONDS)) as changes:
            async for generation in changes:
                if generation is None:
                    yield ": keep-alive\n\n"
                else:
                    yield f"event: worklist\ndata: {json.dumps({'generation': generation})}\n\n"
                if loop_time() >= deadline:
                    break

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
