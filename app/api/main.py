"""The FastAPI application, built from settings with its collaborators injected."""

from __future__ import annotations

from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import __version__
from app.api import routes_admin, routes_exports, routes_health, routes_pages, routes_studies
from app.api.problems import CatchUnexpected, RefuseNul, install_problem_handlers
from app.broker import Broker
from app.settings import Settings


class NoStoreForApi:
    """API answers carry patient data (worklists, scores, pictures): no browser or proxy keeps a
    copy unless a route says otherwise. Plain ASGI, so the live event stream passes untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            await self.app(scope, receive, send)
            return

        async def send_no_store(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if "cache-control" not in headers:
                    headers["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_no_store)


def create_app(settings: Settings, session_factory: sessionmaker[Session], broker: Broker | None) -> FastAPI:
    """``broker`` takes rescores and export retries, and is probed for readiness (None: no broker;
    the assembler's outbox relay hands rescores over)."""
    app = FastAPI(title="cttriage", version=__version__,
                  description="Chest CT triage: COVID-19 identification and max-lung severity worklist.")
    app.state.settings = settings
    app.state.session_factory = session_factory
    app.state.broker = broker
    install_problem_handlers(app)
    app.add_middleware(NoStoreForApi)
    app.add_middleware(RefuseNul)
    app.add_middleware(CatchUnexpected)  # outermost of ours: a bug in any of them is answered too

    app.include_router(routes_studies.router)
    app.include_router(routes_health.router)
    app.include_router(routes_admin.router)
    app.include_router(routes_exports.router)  # results sent back to the PACS
    app.include_router(routes_pages.router)  # the web pages: worklist, study detail, admin
    return app
